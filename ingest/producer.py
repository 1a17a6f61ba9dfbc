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
import time
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException

from heapsync.kafka import AsyncProducer
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
ProducerFactory = Callable[[ErrorCallback], AsyncProducer]


class IngestProducer(AsyncProducer):
    """``AsyncProducer`` whose poll thread survives errors raised from ``poll`` and reports them."""

    def __init__(self, bootstrap: str, on_error: ErrorCallback, **kwargs: Any) -> None:
        self._on_error = on_error
        extra = {**kwargs.pop("extra", {}), "error_cb": on_error}
        super().__init__(bootstrap, extra=extra, **kwargs)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except KafkaException as exc:  # confluent-kafka raises fatal errors from poll
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is not None:
                    self._on_error(err)
            except Exception:  # noqa: BLE001 - a callback bug must not stop delivery reports
                log.exception("producer poll failed")


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

    def get(self) -> AsyncProducer:
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
    def make(on_error: ErrorCallback) -> AsyncProducer:
        return IngestProducer(
            settings.kafka_bootstrap, on_error, delivery_timeout_s=settings.produce_timeout_seconds,
            extra={"queue.buffering.max.kbytes": settings.ingest_queue_max_kbytes,
                   "linger.ms": settings.ingest_linger_ms, "logger": kafka_log},
        )
    return make
