"""Follows the sink's lists topic (member counts, held chunks, hold decisions) in a thread.

Every replica of a sink reads the whole topic, so whichever one owns a list's partition after a
rebalance knows its count and its held deltas, and sees an operator's decision. ``sync`` waits
until everything written before the call has been read: after an assignment the runner calls it
before applying anything, so a list's previous owner's last hold is never overtaken. A tail
thread that died is started again (it reads the topic from its beginning again); ``sync`` reports
whether it caught up, and the runner never applies a chunk before it has.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from heapsync.kafka import client_config

log = logging.getLogger("heapsync.sink.lists")

Batch = list[tuple[str, bytes | None]]


class ListsTail:
    def __init__(self, bootstrap: str, topic: str, on_records: Callable[[Batch], None]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.on_records = on_records
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._positions: dict[int, int] = {}
        self._waiters: list[tuple[dict[int, int], asyncio.Future[None]]] = []
        self._requests: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="sink-lists-tail", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_alive(self) -> bool:
        """Start the tail again when its thread died; True when it was restarted (then sync again)."""
        if self._loop is None or self._stop.is_set() or self.alive():
            return False
        log.error("lists topic tail had stopped; started again")
        self._positions = {}
        self._waiters = []  # the dead thread's; their sync() calls time out and are retried
        self.start(self._loop)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def sync(self, timeout: float = 30.0) -> bool:
        """Wait until every record written before now has been read; False on timeout (logged)."""
        self.ensure_alive()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._requests.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("lists topic not read to its end in time; held deltas of other replicas may be unknown",
                        extra={"timeout_seconds": timeout})
            return False

    def _resolve(self, future: asyncio.Future[None]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_done, future)

    def _run(self) -> None:
        consumer = Consumer({**client_config(self.bootstrap), "group.id": f"heapsync-lists-{uuid.uuid4().hex[:8]}",
                             "enable.auto.commit": False, "enable.partition.eof": True})
        try:
            parts: list[int] = []
            while not self._stop.is_set() and not parts:
                try:
                    meta = consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
                    if meta is not None and meta.error is None and meta.partitions:
                        parts = sorted(meta.partitions)
                except KafkaException:
                    pass
                if not parts:
                    time.sleep(0.5)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            while not self._stop.is_set():
                self._take_requests(consumer, parts)
                batch: Batch = []
                for msg in consumer.consume(500, 0.2):
                    partition, offset = msg.partition(), msg.offset()
                    if (error := msg.error()) is not None:
                        if error.code() == KafkaError._PARTITION_EOF and partition is not None and offset is not None:
                            self._positions[partition] = max(self._positions.get(partition, 0), offset)
                        continue
                    if partition is not None and offset is not None:
                        self._positions[partition] = offset + 1
                    batch.append(((msg.key() or b"").decode("utf-8", "replace"), msg.value()))
                if batch and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.on_records, batch)
                self._check_waiters()
        except Exception:  # noqa: BLE001 - logged; ensure_alive() (the runner's loop, sync()) starts it again
            log.exception("lists topic tail stopped")
        finally:
            consumer.close()

    def _take_requests(self, consumer: Consumer, parts: list[int]) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        if not requests:
            return
        targets: dict[int, int] = {}
        for p in parts:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5.0)
            except KafkaException:
                with self._lock:
                    self._requests.extend(requests)  # asked again on the next round
                return
            targets[p] = high
        for future in requests:
            self._waiters.append((targets, future))

    def _check_waiters(self) -> None:
        still = []
        for targets, future in self._waiters:
            if all(self._positions.get(p, 0) >= high for p, high in targets.items()):
                self._resolve(future)
            else:
                still.append((targets, future))
        self._waiters = still


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
