"""Thin asyncio shells over confluent-kafka: an awaitable idempotent producer and topic admin."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from heapsync.settings import Settings

log = logging.getLogger(__name__)


class ProduceError(Exception):
    """The broker did not take the record (down, too slow, or refused it)."""

    def __init__(self, reason: str, retriable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable


class QueueFull(ProduceError):
    def __init__(self) -> None:
        super().__init__("local producer queue is full", retriable=True)


class AsyncProducer:
    """An idempotent producer (acks=all) whose ``send`` resolves when the broker acked.

    confluent-kafka calls delivery callbacks from ``poll``; a daemon thread polls
    and hands results back to the event loop, so no request blocks the loop.
    """

    def __init__(self, bootstrap: str, *, delivery_timeout_s: float = 10.0, extra: dict[str, Any] | None = None) -> None:
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "compression.type": "lz4",
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "queue.buffering.max.messages": 100_000,
            "queue.buffering.max.kbytes": 256 * 1024,
            "message.max.bytes": 16 * 1024 * 1024,
            "socket.keepalive.enable": True,
        }
        config.update(extra or {})
        self._producer = Producer(config)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None) -> Message:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            def resolve() -> None:
                if future.done():
                    return
                if err is not None:
                    future.set_exception(ProduceError(err.str(), retriable=err.retriable()))
                else:
                    future.set_result(msg)

            loop.call_soon_threadsafe(resolve)

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError as exc:
            raise QueueFull() from exc
        except KafkaException as exc:
            raise ProduceError(str(exc), retriable=False) from exc
        return await future

    def send_nowait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Fire and forget, for best-effort records where the caller flushes later."""
        self._producer.produce(topic, value=value, key=key)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for outstanding records; returns how many are still not delivered."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> int:
        remaining = self.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=1.0)
        return remaining

    def list_topics(self, timeout: float = 2.0) -> set[str]:
        return set(self._producer.list_topics(timeout=timeout).topics)


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Explicit settings per topic: retention long enough to replay after an outage."""
    retention_ms = str(int(settings.topic_retention_days * 86_400_000))
    t = settings.topics
    base = {"retention.ms": retention_ms, "max.message.bytes": str(16 * 1024 * 1024)}
    configs = {name: dict(base) for name in t.all()}
    configs[t.sink_progress] = {"cleanup.policy": "compact", "max.message.bytes": base["max.message.bytes"]}
    configs[t.dlq_redrive] = {"cleanup.policy": "compact", "max.message.bytes": base["max.message.bytes"]}
    return configs


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create any missing heapsync topic; returns the names created."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = topic_configs(settings)
    new = [
        NewTopic(name, num_partitions=settings.topic_partitions,
                 replication_factor=settings.topic_replication, config=cfg)
        for name, cfg in wanted.items() if name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created
