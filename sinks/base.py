"""What every consumer of the deltas topic shares: the sink interface and its Kafka loop.

A downstream consumer is one class implementing :class:`DeltaSink`, run by
:func:`run_sink` with its own consumer group, so it keeps its own progress and
can be replayed on its own. The loop commits a message's offset only after
``apply`` returned (at-least-once); ``apply`` must therefore be idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Protocol, runtime_checkable

import orjson
from confluent_kafka import Consumer, KafkaError, Message
from pydantic import ValidationError

from heapsync.contracts import Delta
from heapsync.kafka import AsyncProducer
from heapsync.settings import Settings

log = logging.getLogger("heapsync.sink")


@runtime_checkable
class DeltaSink(Protocol):
    """A downstream consumer of deltas."""

    name: str

    async def start(self) -> None:
        """Open connections; called once before the first delta."""

    async def apply(self, delta: Delta) -> None:
        """Apply one chunk. Return when it is applied (or dead-lettered by the sink itself);
        raise to stop the loop without committing, so the chunk is redone on restart."""

    async def close(self) -> None:
        """Release connections; called once after the loop ends."""


class DeadLetters:
    """Publishes what a sink could not apply to the sink dead-letter topic, with its reason."""

    def __init__(self, producer: AsyncProducer, topic: str, sink_name: str) -> None:
        self.producer = producer
        self.topic = topic
        self.sink_name = sink_name

    async def send(self, reason: str, detail: dict[str, object], key: str = "") -> None:
        await self.producer.send(self.topic, orjson.dumps({"sink": self.sink_name, "reason": reason, **detail}),
                                 key=key.encode())


class SinkRunner:
    """Consumes the deltas topic for one sink; commits after each applied chunk."""

    def __init__(self, sink: DeltaSink, settings: Settings, dead_letters: DeadLetters, *,
                 group: str | None = None) -> None:
        self.sink = sink
        self.settings = settings
        self.group = group or f"heapsync-sink-{sink.name}"
        self.dead_letters = dead_letters
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def handle(self, msg: Message) -> None:
        try:
            delta = Delta.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            log.error("unreadable delta; dead-lettered", extra={"partition": msg.partition(), "offset": msg.offset()})
            await self.dead_letters.send("unreadable delta", {
                "partition": msg.partition(), "offset": msg.offset(),
                "errors": exc.errors(include_input=False, include_url=False),
                "value": (msg.value() or b"").decode("utf-8", "replace"),
            })
            return
        await self.sink.apply(delta)

    def _consumer(self) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": 3_600_000,
        })

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        consumer = self._consumer()
        consumer.subscribe([self.settings.topics.deltas])
        await self.sink.start()
        log.info("sink started", extra={"sink": self.sink.name, "group": self.group})
        try:
            while not self._stopping.is_set():
                msg = await loop.run_in_executor(None, consumer.poll, 0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error", extra={"error": msg.error().str()})
                    continue
                await self.handle(msg)
                await loop.run_in_executor(None, lambda m=msg: consumer.commit(message=m, asynchronous=False))
        finally:
            await loop.run_in_executor(None, consumer.close)
            await self.sink.close()
            self.dead_letters.producer.close()
            log.info("sink stopped", extra={"sink": self.sink.name})


def make_runner(sink_factory: Callable[[DeadLetters], DeltaSink], settings: Settings, *,
                group: str | None = None) -> SinkRunner:
    """Wire a sink to its dead-letter publisher and the Kafka loop."""
    dead_letters = DeadLetters(AsyncProducer(settings.kafka_bootstrap), settings.topics.sink_dlq, "sink")
    sink = sink_factory(dead_letters)
    dead_letters.sink_name = sink.name
    return SinkRunner(sink, settings, dead_letters, group=group)
