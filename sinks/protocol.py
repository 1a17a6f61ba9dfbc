"""What a sink implements, and what it is given: the contract between a sink and :mod:`sinks.runner`.

A downstream consumer of the deltas topic is one class implementing :class:`DeltaSink`; it may
return a :class:`ChunkResult` per chunk and publishes what it cannot apply through
:class:`DeadLetters`. The Kafka loop that drives it (lanes, offsets, rebalances) is
:class:`sinks.runner.SinkRunner`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential

from heapsync.contracts import Delta
from heapsync.producer import ProduceError, ResilientProducer
from sinks import metrics

log = logging.getLogger("heapsync.sink")


@dataclass
class ChunkResult:
    """What ``DeltaSink.apply`` may return; the runner records it in the progress topic."""

    dead_lettered: int = 0
    path: str = "rest"


@runtime_checkable
class DeltaSink(Protocol):
    """A downstream consumer of deltas."""

    name: str
    # Optional class attribute ``concurrent = False``: the runner then applies one chunk at a
    # time, in offset order, across all lists (for sinks that are not safe to call concurrently).

    async def start(self) -> None:
        """Open connections; called once before the first delta."""

    async def apply(self, delta: Delta) -> ChunkResult | None:
        """Apply one chunk. Return when it is applied (or dead-lettered by the sink itself);
        raise to stop the loop without committing, so the chunk is redone on restart.
        May be called concurrently for chunks of different lists (and for chunks of one delta).
        May be cancelled (a rebalance past ``sink_revoke_grace_seconds``, or shutdown): the chunk is
        then not committed and is applied again, by this or another replica."""

    async def close(self) -> None:
        """Release connections; called once after the loop ends."""


class DeadLetters:
    """Publishes what a sink could not apply to the sink dead-letter topic, with its reason."""

    def __init__(self, producer: ResilientProducer, topic: str, sink_name: str) -> None:
        self.producer = producer
        self.topic = topic
        self.sink_name = sink_name

    async def send(self, reason: str, detail: dict[str, object], key: str = "") -> None:
        metrics.DEAD_LETTERS.labels(self.sink_name, reason).inc()
        await send_retrying(self.producer, self.topic,
                             orjson.dumps({"sink": self.sink_name, "reason": reason, **detail}), key.encode())


def _log_retry(topic: str, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning("produce failed; retrying", extra={"topic": topic, "error": getattr(exc, "reason", str(exc)),
                                                   "attempt": state.attempt_number})


async def send_retrying(producer: ResilientProducer, topic: str, value: bytes | None, key: bytes,
                         give_up_after: float = 120.0) -> None:
    """A record we must not lose: retry a broker hiccup for a while, then raise (chunk redone later).

    A fatal producer error is retriable here: ``ResilientProducer`` sends the next attempt
    through a fresh producer.
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(lambda e: isinstance(e, ProduceError) and e.retriable),
        stop=stop_after_delay(give_up_after), wait=wait_exponential(multiplier=0.2, max=5.0),
        before_sleep=lambda state: _log_retry(topic, state), reraise=True,
    ):
        with attempt:
            await producer.send(topic, value, key=key)
