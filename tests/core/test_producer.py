"""The shared producer: acks from a real broker, bounded waits, and replacement after a fatal error."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from confluent_kafka import KafkaError

from heapsync.producer import LoopProducer, ProduceError, ResilientProducer, is_retriable
from heapsync.topic_reader import read_topic
from heapsync_dev.broker import EmbeddedBroker
from heapsync_dev.processes import free_port
from tests.conftest import create_topic


async def test_send_resolves_once_the_broker_holds_the_record(broker: EmbeddedBroker) -> None:
    topic = create_topic(broker.bootstrap, f"producer-{uuid.uuid4().hex[:8]}")
    producer = ResilientProducer.connect(broker.bootstrap)
    try:
        msgs = await asyncio.gather(*(producer.send(topic, f"v{i}".encode(), key=b"k", timeout=30)
                                      for i in range(50)))
    finally:
        assert producer.close(5) == 0
    assert [m.offset() for m in msgs] == list(range(50))  # one key, one partition, in order

    seen = [r.value for r in read_topic(broker.bootstrap, topic, from_offset=0)]
    assert seen == [f"v{i}".encode() for i in range(50)]


async def test_send_gives_up_within_its_timeout_when_no_broker_answers() -> None:
    producer = LoopProducer(f"127.0.0.1:{free_port()}", delivery_timeout_s=30.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await producer.send("nowhere", b"x", timeout=0.3)
    assert loop.time() - started < 2.0
    producer.close(0)


def test_a_record_the_brokers_did_not_take_in_time_may_be_sent_again() -> None:
    """Every broker away for longer than message.timeout.ms: librdkafka fails the record as not
    retriable, and the sink, which retries only retriable failures, stopped on its progress record."""
    for code in (KafkaError._MSG_TIMED_OUT, KafkaError._ALL_BROKERS_DOWN, KafkaError.NOT_ENOUGH_REPLICAS,
                 KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.NOT_LEADER_FOR_PARTITION):
        assert is_retriable(KafkaError(code)), KafkaError(code).name()
    for code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.INVALID_MSG):
        assert not is_retriable(KafkaError(code)), KafkaError(code).name()


async def test_a_timed_out_delivery_fails_as_retriable() -> None:
    producer = LoopProducer(f"127.0.0.1:{free_port()}", delivery_timeout_s=0.5)  # no broker there
    with pytest.raises(ProduceError) as caught:
        await producer.send("nowhere", b"x", timeout=30)
    assert caught.value.retriable and not caught.value.fatal, caught.value.reason
    producer.close(0)


class _DeadThenAlive:
    """Stands in for librdkafka's producer only: a fatal idempotence error cannot be caused on demand."""

    made: list[_DeadThenAlive] = []

    def __init__(self, fatal: bool) -> None:
        self.fatal = fatal
        self.closed = False
        self.sent: list[bytes] = []
        self.gate: asyncio.Event | None = None  # when set up, a failing send waits for it

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: object = None, *,
                   timeout: float | None = None, partition: int | None = None) -> str:
        if self.fatal:
            if self.gate is not None and value == b"late":
                await self.gate.wait()
            raise ProduceError("Local: Fatal error: UNKNOWN_PRODUCER_ID", retriable=False, fatal=True)
        self.sent.append(value)
        return "ok"

    def close(self, timeout: float = 10.0) -> int:
        self.closed = True
        return 0


async def test_a_fatal_error_is_retriable_and_the_next_send_uses_a_fresh_producer() -> None:
    made: list[_DeadThenAlive] = []
    replaced: list[int] = []

    def factory(on_error: object) -> _DeadThenAlive:
        made.append(_DeadThenAlive(fatal=not made))  # the first one is dead
        return made[-1]

    producer = ResilientProducer(factory, on_replace=lambda: replaced.append(1))  # type: ignore[arg-type]
    with pytest.raises(ProduceError) as caught:
        await producer.send("t", b"first")
    assert caught.value.retriable and caught.value.fatal
    assert await producer.send("t", b"again") == "ok"
    await asyncio.sleep(0.05)  # the dead producer is closed off the loop
    assert len(made) == 2 and made[0].closed and made[1].sent == [b"again"]
    assert replaced == [1]
    assert await producer.send("t", b"more") == "ok" and len(made) == 2  # replaced once, not per send


async def test_late_failures_of_a_replaced_producer_do_not_replace_its_successor() -> None:
    made: list[_DeadThenAlive] = []

    def factory(on_error: object) -> _DeadThenAlive:
        made.append(_DeadThenAlive(fatal=not made))
        if len(made) == 1:
            made[0].gate = asyncio.Event()
        return made[-1]

    producer = ResilientProducer(factory)  # type: ignore[arg-type]
    late = asyncio.create_task(producer.send("t", b"late"))  # in flight on the producer that will die
    await asyncio.sleep(0)
    with pytest.raises(ProduceError):
        await producer.send("t", b"first")  # the fatal error: replaced on the next send
    assert await producer.send("t", b"on the new one") == "ok" and len(made) == 2
    made[0].gate.set()  # type: ignore[union-attr]
    with pytest.raises(ProduceError):
        await late  # the old producer's record fails after its replacement...
    assert await producer.send("t", b"still the new one") == "ok"
    assert len(made) == 2  # ...and does not condemn the new producer
    assert made[1].sent == [b"on the new one", b"still the new one"]


def test_java_partition_is_kafkas_murmur2() -> None:
    """Vectors from Apache Kafka's own murmur2 tests (Utils.murmur2, signed), then its toPositive % n."""
    from heapsync.kafka import java_partition

    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
               b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    for key, signed in vectors.items():
        for partitions in (1, 3, 6, 7, 100):
            assert java_partition(key, partitions) == (signed & 0x7FFFFFFF) % partitions
