"""Creating topics returns only once the brokers' metadata shows them led.

Apache Kafka acknowledges CreateTopics before every broker's metadata has the topic; `heapsync topics`
once reported freshly created topics as "missing" (no partitions, no replication) on a 3-node cluster.
The brokers' metadata is what cannot run here in that exact state, so it is a stand-in of the
metadata answers; the real path runs in tests/chain/test_kafka_faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from heapsync.kafka import create_missing, led, wait_until_led


@dataclass
class Part:
    leader: int = 1
    error: Any = None


@dataclass
class Topic:
    partitions: dict[int, Part] = field(default_factory=lambda: {0: Part(), 1: Part()})
    error: Any = None


@dataclass
class Metadata:
    topics: dict[str, Topic]


class Admin:
    """Answers metadata requests from a script: one answer per call, the last one repeated."""

    def __init__(self, answers: list[dict[str, Topic] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def list_topics(self, timeout: float) -> Metadata:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if answer is None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return Metadata(answer)

    def create_topics(self, new: list[NewTopic], request_timeout: float) -> dict[str, Any]:
        from concurrent.futures import Future

        done: dict[str, Any] = {}
        for t in new:
            done[t.topic] = Future()
            done[t.topic].set_result(None)
        return done


def test_a_topic_is_led_only_with_a_leader_for_every_partition_and_no_error() -> None:
    assert led(Topic())
    assert not led(None)
    assert not led(Topic(partitions={}))
    assert not led(Topic(partitions={0: Part(), 1: Part(leader=-1)}))
    assert not led(Topic(partitions={0: Part(error="LEADER_NOT_AVAILABLE")}))
    assert not led(Topic(error="UNKNOWN_TOPIC_OR_PART"))


def test_waits_until_every_created_topic_is_led() -> None:
    admin = Admin([{}, {"a": Topic()}, {"a": Topic(), "b": Topic(partitions={0: Part(leader=-1)})},
                   {"a": Topic(), "b": Topic()}])
    wait_until_led(admin, ["a", "b"], timeout=10)  # type: ignore[arg-type]
    assert admin.calls == 4


def test_gives_up_at_the_timeout_and_says_which(caplog: Any) -> None:
    admin = Admin([{"a": Topic()}])
    wait_until_led(admin, ["a", "b"], timeout=0.5)  # type: ignore[arg-type]
    assert "not yet led" in caplog.text and "'b'" in caplog.text and "'a'" not in caplog.text


def test_nothing_created_asks_nothing() -> None:
    admin = Admin([{}])
    wait_until_led(admin, [], timeout=10)  # type: ignore[arg-type]
    assert admin.calls == 0


def test_a_metadata_error_while_waiting_is_retried_not_raised() -> None:
    admin = Admin([None, {"a": Topic()}])
    wait_until_led(admin, ["a"], timeout=10)  # type: ignore[arg-type]
    assert admin.calls == 2


def test_creating_returns_only_once_the_new_topics_are_led() -> None:
    """Before: CreateTopics acknowledged, then `heapsync topics` read the metadata and saw them missing."""
    admin = Admin([{"old": Topic()}, {"old": Topic()}, {"old": Topic(), "new": Topic()}])
    created = create_missing(admin, [NewTopic("old", 2, 1), NewTopic("new", 2, 1)], timeout=10)  # type: ignore[arg-type]
    assert created == ["new"]
    assert admin.calls == 3  # existing topics, then metadata until "new" is led
