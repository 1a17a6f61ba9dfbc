"""The one Kafka producer every heapsync process uses: awaitable, idempotent, replaced when it dies.

``LoopProducer`` is confluent-kafka's producer (idempotent, ``acks=all``) with a ``send`` that
resolves when the broker acknowledged the record. It is polled from the event loop, not from a
thread: at thousands of records per second, a poll thread handing every delivery back with
``call_soon_threadsafe`` costs a wake-up write and a GIL hand-over per record, which doubled the
ingress's CPU per request. ``poll(0)`` runs on the loop every millisecond while records are
outstanding (adding at most that to an acknowledgement) and every half second otherwise, so that
client errors and logs are still served.

``ResilientProducer`` holds one ``LoopProducer`` and swaps in a fresh one after a *fatal* client
error. An idempotent producer turns fatal when the broker no longer knows its producer id and it
cannot retry without risking duplicates (seen when a broker loses its state; possible after long
idleness on Apache Kafka). A fatal producer never sends again, so without the swap a process would
fail every later record. Records waiting in the dead producer fail; their callers see
``ProduceError`` and retry (the ingress answers 503 so that Heap retries): at-least-once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from heapsync.kafka import ERROR_LOG_INTERVAL_SECONDS, client_config

log = logging.getLogger("heapsync.kafka")


class ProduceError(Exception):
    """The broker did not take the record (down, too slow, or refused it)."""

    def __init__(self, reason: str, retriable: bool = True, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable
        self.fatal = fatal
        """The producer that raised it is dead (see ``ResilientProducer``)."""


class QueueFull(ProduceError):
    def __init__(self) -> None:
        super().__init__("local producer queue is full", retriable=True)


ErrorCallback = Callable[[KafkaError], None]


def producer_config(bootstrap: str, *, delivery_timeout_s: float = 10.0,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Durable by default: idempotent, every in-sync replica acknowledges, bounded local queue."""
    config: dict[str, Any] = {
        **client_config(bootstrap),
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
    return config


def _is_fatal(err: KafkaError) -> bool:
    return err.fatal() or err.code() == KafkaError._FATAL


BROKER_AWAY = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.BROKER_NOT_AVAILABLE,
})
"""Delivery failures that mean "the brokers did not take it in time" (down, electing a leader, below
``min.insync.replicas``). librdkafka reports most of them as not retriable, since it already retried
until ``message.timeout.ms``; for a caller the same record sent again later can succeed."""


def is_retriable(err: KafkaError) -> bool:
    """Whether sending the record again may succeed (a broker outage), as opposed to a record or
    setting the broker will always refuse (too large, not authorised)."""
    return err.retriable() or err.code() in BROKER_AWAY


class LoopProducer:
    """An idempotent producer whose ``send`` resolves when the broker acked (see the module docstring)."""

    POLL_INTERVAL_S = 0.001
    IDLE_POLL_INTERVAL_S = 0.5

    def __init__(self, bootstrap: str, *, delivery_timeout_s: float = 10.0, extra: dict[str, Any] | None = None,
                 on_error: ErrorCallback | None = None) -> None:
        self._on_error = on_error or (lambda err: None)
        config = producer_config(bootstrap, delivery_timeout_s=delivery_timeout_s, extra=extra)
        config["error_cb"] = self._on_error
        self._producer = Producer(config)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._busy_poller: asyncio.Task[None] | None = None
        self._idle_poller: asyncio.Task[None] | None = None

    # ---- polling on the event loop

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
        while not self._closed:
            self._poll_once()
            await asyncio.sleep(self.IDLE_POLL_INTERVAL_S)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._idle_poller = loop.create_task(self._poll_while_idle())
        if self._busy_poller is None:
            self._busy_poller = loop.create_task(self._poll_while_busy())

    # ---- producing

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   headers: list[tuple[str, str | bytes | None]] | None = None, *, timeout: float | None = None,
                   partition: int | None = None) -> Message:
        """Resolve when the broker acked; ``ProduceError`` if it refused; ``asyncio.TimeoutError`` after ``timeout``.

        The record may still be delivered after a timeout (at-least-once: the caller treats it as
        failed and sends again, and the pipeline's idempotent steps absorb the repeat).
        """
        loop = self._loop
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            # asyncio.get_running_loop() costs a getpid() system call: once per loop, not per record
            loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            def resolve() -> None:
                if future.done():
                    return  # the caller gave up waiting (timeout)
                if err is not None:
                    future.set_exception(ProduceError(err.str(), retriable=is_retriable(err), fatal=_is_fatal(err)))
                else:
                    future.set_result(msg)

            if threading.get_ident() == self._loop_thread:
                resolve()
            else:  # e.g. a flush from another thread while closing
                loop.call_soon_threadsafe(resolve)

        try:
            if partition is None:  # the client's partitioner picks (librdkafka's default: CRC32 of the key)
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
            else:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery,
                                       partition=partition)
        except BufferError as exc:
            raise QueueFull() from exc
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            raise ProduceError(str(exc), retriable=False, fatal=err is not None and _is_fatal(err)) from exc
        self._attach(loop)
        if timeout is None:
            return await future
        expiry = loop.call_later(timeout, _expire, future)  # cheaper than asyncio.timeout() per request
        try:
            return await future
        finally:
            expiry.cancel()

    def send_nowait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Fire and forget, for best-effort records where the caller flushes later."""
        self._producer.produce(topic, value=value, key=key)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for outstanding records; returns how many are still not delivered."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> int:
        remaining = self.flush(timeout)
        self._closed = True
        for task in (self._busy_poller, self._idle_poller):
            if task is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(task.cancel)
        return remaining

    def list_topics(self, timeout: float = 2.0) -> set[str]:
        return set(self._producer.list_topics(timeout=timeout).topics)

    def partition_count(self, topic: str, timeout: float = 10.0) -> int:
        """How many partitions ``topic`` has (KafkaException if the broker does not say in time)."""
        meta = self._producer.list_topics(topic, timeout=timeout).topics[topic]
        if meta.error is not None:
            raise KafkaException(meta.error)
        return len(meta.partitions)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


ProducerFactory = Callable[[ErrorCallback], LoopProducer]


class ResilientProducer:
    """Sends through the current ``LoopProducer`` and replaces it after a fatal client error."""

    def __init__(self, factory: ProducerFactory, *, on_replace: Callable[[], None] | None = None) -> None:
        self._factory = factory
        self._on_replace = on_replace
        self._fatal = False
        self._last_logged: dict[int, float] = {}
        self.current = self._new()

    @classmethod
    def connect(cls, bootstrap: str, *, delivery_timeout_s: float = 10.0, extra: dict[str, Any] | None = None,
                on_replace: Callable[[], None] | None = None) -> ResilientProducer:
        def make(on_error: ErrorCallback) -> LoopProducer:
            return LoopProducer(bootstrap, delivery_timeout_s=delivery_timeout_s, extra=extra, on_error=on_error)
        return cls(make, on_replace=on_replace)

    def _new(self) -> LoopProducer:
        made: list[LoopProducer] = []
        producer = self._factory(lambda err: self._on_error(err, made[0] if made else None))
        made.append(producer)
        return producer

    def _mark_fatal(self, producer: LoopProducer | None, reason: str) -> None:
        """Replace ``producer`` on the next send, unless it was replaced already.

        A replaced producer still reports: its records in flight fail and its close reports
        errors. Those must not condemn its successor (each would cost a new producer and fail
        the records in flight on it).
        """
        if producer is not None and producer is not self.current:
            return
        if not self._fatal:
            log.error("kafka producer fatal error; replacing the producer", extra={"kafka_error": reason})
        self._fatal = True

    def _on_error(self, err: KafkaError, producer: LoopProducer | None) -> None:
        if _is_fatal(err):
            self._mark_fatal(producer, err.str())
        else:
            # a broker outage reports every reconnect attempt: one line per error kind per interval
            now = time.monotonic()
            if now - self._last_logged.get(err.code(), 0.0) >= ERROR_LOG_INTERVAL_SECONDS:
                self._last_logged[err.code()] = now
                log.warning("kafka client error", extra={"kafka_error": err.str()})

    def get(self) -> LoopProducer:
        """The live producer; a fatal one is replaced here (and closed off the loop, since flushing blocks)."""
        if self._fatal:
            old, self._fatal = self.current, False
            self.current = self._new()
            if self._on_replace is not None:
                self._on_replace()
            try:
                asyncio.get_running_loop().run_in_executor(None, old.close, 1.0)
            except RuntimeError:  # no loop: close here
                old.close(1.0)
        return self.current

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   headers: list[tuple[str, str | bytes | None]] | None = None, *, timeout: float | None = None,
                   partition: int | None = None) -> Message:
        """``LoopProducer.send`` on the live producer.

        A fatal failure marks the producer for replacement and is raised as retriable: the next
        attempt goes through a fresh producer.
        """
        producer = self.get()
        try:
            return await producer.send(topic, value, key, headers, timeout=timeout, partition=partition)
        except ProduceError as exc:
            if not exc.fatal:
                raise
            self._mark_fatal(producer, exc.reason)
            raise ProduceError(exc.reason, retriable=True, fatal=True) from exc

    def send_nowait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.get().send_nowait(topic, value, key)

    def flush(self, timeout: float = 10.0) -> int:
        return self.current.flush(timeout)

    def close(self, timeout: float = 10.0) -> int:
        return self.current.close(timeout)

    def list_topics(self, timeout: float = 2.0) -> set[str]:
        return self.current.list_topics(timeout)

    def partition_count(self, topic: str, timeout: float = 10.0) -> int:
        return self.current.partition_count(topic, timeout)
