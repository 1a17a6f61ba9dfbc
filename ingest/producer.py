"""The ingress's Kafka producer, replaced when librdkafka declares it dead.

An idempotent producer turns *fatal* when the broker no longer knows its producer
id and it cannot retry without risking duplicates (seen when a broker loses its
state; also possible after long idleness on Apache Kafka). A fatal producer never
sends again, so the ingress would answer 503 forever. The slot notices and swaps
in a fresh producer; records that were waiting in the dead one fail, their
requests get 503, and Heap retries them: at-least-once, nothing lost.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, Message

from heapsync.kafka import AsyncProducer, ProduceError, QueueFull
from heapsync.settings import Settings
from ingest import metrics

log = logging.getLogger("heapsync.ingest")
kafka_log = logging.getLogger("heapsync.ingest.kafka")
"""librdkafka's own log lines, routed through logging so that they come out as JSON too."""

ERROR_LOG_INTERVAL_SECONDS = 10.0
_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets one line per kind of message through per interval (reconnect attempts repeat every few ms)."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _DIGITS.sub("", record.getMessage())[:160]
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self.interval:
            return False
        self._last[kind] = now
        return True


kafka_log.addFilter(RepeatFilter())

ErrorCallback = Callable[[KafkaError], None]
ProducerFactory = Callable[[ErrorCallback], "IngestProducer"]


class IngestProducer(AsyncProducer):
    """``AsyncProducer`` (same idempotent, acks=all config) polled from the event loop instead of a thread.

    Why: at thousands of pages per second, a poll thread handing every delivery back
    with ``call_soon_threadsafe`` costs a wake-up write and a GIL hand-over per record,
    which doubled the ingress's CPU per request. Here ``poll(0)`` runs on the loop every
    millisecond while records are outstanding (adding at most that to a 200), and every
    half second otherwise, so that client errors and logs are still served.
    """

    POLL_INTERVAL_S = 0.001
    IDLE_POLL_INTERVAL_S = 0.5

    def __init__(self, bootstrap: str, on_error: ErrorCallback, **kwargs: Any) -> None:
        self._on_error = on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._busy_poller: asyncio.Task[None] | None = None
        self._idle_poller: asyncio.Task[None] | None = None
        extra = {**kwargs.pop("extra", {}), "error_cb": on_error}
        super().__init__(bootstrap, extra=extra, **kwargs)

    def _poll_loop(self) -> None:
        """The base class's poll thread ends at once: the event loop polls (see ``_poll_once``)."""

    def _poll_once(self) -> None:
        try:
            self._producer.poll(0)
        except KafkaException as exc:  # confluent-kafka raises fatal errors from poll
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None:
                self._on_error(err)
        except Exception:  # noqa: BLE001 - a callback bug must not stop delivery reports
            log.exception("producer poll failed")

    async def _poll_while_busy(self) -> None:
        try:
            while len(self._producer) > 0:
                self._poll_once()
                await asyncio.sleep(self.POLL_INTERVAL_S)
            self._poll_once()
        finally:
            self._busy_poller = None

    async def _poll_while_idle(self) -> None:
        while not self._stop.is_set():
            self._poll_once()
            await asyncio.sleep(self.IDLE_POLL_INTERVAL_S)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._idle_poller = loop.create_task(self._poll_while_idle())
        if self._busy_poller is None:
            self._busy_poller = loop.create_task(self._poll_while_busy())

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None, *, timeout: float | None = None) -> Message:
        """Resolve when the broker acked; ``asyncio.TimeoutError`` after ``timeout`` seconds.

        The record may still be delivered after a timeout (at-least-once: the caller answered
        503, so Heap retries it and the pipeline's idempotent steps absorb the repeat).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            def resolve() -> None:
                if future.done():
                    return  # the request gave up waiting (timeout): it already answered 503
                if err is not None:
                    future.set_exception(ProduceError(err.str(), retriable=err.retriable()))
                else:
                    future.set_result(msg)

            if threading.get_ident() == self._loop_thread:
                resolve()
            else:  # e.g. a flush from another thread while closing
                loop.call_soon_threadsafe(resolve)

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError as exc:
            raise QueueFull() from exc
        except KafkaException as exc:
            raise ProduceError(str(exc), retriable=False) from exc
        self._attach(loop)
        if timeout is None:
            return await future
        expiry = loop.call_later(timeout, _expire, future)  # cheaper than asyncio.timeout() per request
        try:
            return await future
        finally:
            expiry.cancel()

    def close(self, timeout: float = 10.0) -> int:
        remaining = super().close(timeout)
        for task in (self._busy_poller, self._idle_poller):
            if task is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(task.cancel)
        return remaining


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


class ProducerSlot:
    """Holds the current producer and swaps in a new one after a fatal client error."""

    def __init__(self, factory: ProducerFactory) -> None:
        self._factory = factory
        self._fatal = False
        self._last_logged: dict[int, float] = {}
        self.current = factory(self._on_error)

    def _on_error(self, err: KafkaError) -> None:  # called from the producer's poll thread
        if err.fatal() or err.code() == KafkaError._FATAL:
            if not self._fatal:
                log.error("kafka producer fatal error; replacing the producer", extra={"kafka_error": err.str()})
            self._fatal = True
        else:
            # a broker outage reports every reconnect attempt: one line per error kind per interval
            now = time.monotonic()
            if now - self._last_logged.get(err.code(), 0.0) >= ERROR_LOG_INTERVAL_SECONDS:
                self._last_logged[err.code()] = now
                log.warning("kafka client error", extra={"kafka_error": err.str()})

    def get(self) -> IngestProducer:
        if self._fatal:
            old, self._fatal = self.current, False
            self.current = self._factory(self._on_error)
            metrics.PRODUCER_RESTARTS.inc()
            asyncio.get_running_loop().run_in_executor(None, old.close, 1.0)
        return self.current

    def note_failure(self, exc: BaseException) -> None:
        """A produce call refused with a fatal error means the producer is dead too."""
        cause = exc.__cause__
        if isinstance(cause, KafkaException) and cause.args and isinstance(cause.args[0], KafkaError):
            if cause.args[0].fatal() or cause.args[0].code() == KafkaError._FATAL:
                self._on_error(cause.args[0])

    def close(self, timeout: float) -> int:
        return self.current.close(timeout=timeout)


def default_factory(settings: Settings) -> ProducerFactory:
    def make(on_error: ErrorCallback) -> IngestProducer:
        return IngestProducer(
            settings.kafka_bootstrap, on_error, delivery_timeout_s=settings.produce_timeout_seconds,
            extra={"queue.buffering.max.kbytes": settings.ingest_queue_max_kbytes,
                   "linger.ms": settings.ingest_linger_ms, "logger": kafka_log},
        )
    return make
