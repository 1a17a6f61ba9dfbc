"""The local Apache Kafka launcher: production-shaped settings, data that survives a restart,
a killed leader replaced and the killed node back on its own data, and nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from heapsync_dev.apache_kafka import (
    DEFAULT_KAFKA_VERSION,
    KafkaCluster,
    fetch,
    new_cluster_id,
    node_properties,
    runtime_pom,
)
from heapsync_dev.processes import free_port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is not running
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_three_nodes_keep_every_write_on_two_replicas() -> None:
    props = node_properties(2, host="127.0.0.1", port=1, controller_port=2, voters="1@h:2,2@h:3,3@h:4",
                            log_dir=Path("/d"), nodes=3)
    assert props["node.id"] == "2" and props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@h:2,2@h:3,3@h:4"
    assert (props["default.replication.factor"], props["min.insync.replicas"]) == ("3", "2")
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["auto.create.topics.enable"] == "false"  # as docker-compose.yml: topics come from `heapsync topics`
    one = node_properties(1, host="127.0.0.1", port=1, controller_port=2, voters="1@h:2", log_dir=Path("/d"), nodes=1)
    assert (one["default.replication.factor"], one["min.insync.replicas"], one["transaction.state.log.min.isr"]) == (
        "1", "1", "1")
    assert node_properties(1, host="h", port=1, controller_port=2, voters="v", log_dir=Path("/d"), nodes=1,
                           overrides={"min.insync.replicas": "3"})["min.insync.replicas"] == "3"


def test_runtime_pom_brings_the_logging_backend_of_each_line() -> None:
    assert "log4j-slf4j-impl" in runtime_pom("4.4.0") and "reload4j" not in runtime_pom("4.4.0")
    assert "slf4j-reload4j" in runtime_pom("3.9.0")
    assert "<version>3.9.0</version></dependency>" in runtime_pom("3.9.0")


def test_cluster_ids_are_what_kafka_storage_expects() -> None:
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 22 and "=" not in i for i in ids)
    # one in 64 random ids starts with "-", which `kafka-storage format -t` takes for an option
    assert not any(i.startswith("-") for i in ids)


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for v in values:
        p.produce(topic, v)
    assert p.flush(60) == 0


def read_all(bootstrap: str, topic: str, partitions: int, expected: int, timeout: float = 60.0) -> list[bytes]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{time.monotonic_ns()}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                got.append(m.value())
    finally:
        c.close()
    return got


def create_topic(bootstrap: str, topic: str, partitions: int, replicas: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the future resolves
    admin.create_topics([NewTopic(topic, partitions, replicas)])[topic].result(30)


@pytest.mark.integration
def test_a_node_keeps_its_data_across_a_restart_and_leaves_nothing_running(kafka_tier: None, tmp_path: Path) -> None:
    cluster = KafkaCluster(nodes=1, data_dir=tmp_path / "data")
    cluster.start()
    try:
        pid = cluster.pid(1)
        assert pid is not None
        create_topic(cluster.bootstrap, "kept", 2, 1)
        produce(cluster.bootstrap, "kept", [b"a", b"b", b"c"])
        cluster.stop()
        assert not alive(pid)
        assert (tmp_path / "data" / "node-1.log").exists()  # the log is kept with a given data dir

        cluster.start()  # same data dir: formatted already, same ports, same cluster
        assert sorted(read_all(cluster.bootstrap, "kept", 2, 3)) == [b"a", b"b", b"c"], cluster.logs()
        pid = cluster.pid(1)
    finally:
        cluster.stop()
    assert pid is not None and not alive(pid)


@pytest.mark.integration
def test_killed_leader_is_replaced_and_comes_back_on_its_data(kafka_tier: None, tmp_path: Path) -> None:
    with KafkaCluster(nodes=3, log_dir=tmp_path) as cluster:
        assert len(cluster.bootstrap.split(",")) == 3
        pids = [cluster.pid(i) for i in (1, 2, 3)]
        create_topic(cluster.bootstrap, "faults", 1, 3)
        produce(cluster.bootstrap, "faults", [b"before"])
        old = cluster.leader("faults")
        assert old in (1, 2, 3)

        cluster.kill(old)
        deadline = time.monotonic() + 60
        while cluster.leader("faults") in (old, None) and time.monotonic() < deadline:
            time.sleep(0.5)
        new = cluster.leader("faults")
        assert new not in (old, None), cluster.logs()
        produce(cluster.bootstrap, "faults", [b"during"])  # two of three replicas: min.insync.replicas=2 holds

        cluster.start_node(old)
        assert cluster.pid(old) is not None
        assert read_all(cluster.bootstrap, "faults", 1, 2) == [b"before", b"during"], cluster.logs()
    assert not any(alive(p) for p in pids if p is not None)
    assert all(n.process is None for n in cluster.members)


@pytest.mark.integration
def test_kafka_start_runs_until_ctrl_c_and_stops_every_node(kafka_tier: None, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "kafka.out"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEAPSYNC_KAFKA_BOOTSTRAP")}}
    proc = subprocess.Popen([sys.executable, "-m", "heapsync_ops.cli", "kafka", "start", "--port", str(port),
                             "--data-dir", str(tmp_path / "data")],
                            cwd=tmp_path, env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops every node" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert f"Apache Kafka {DEFAULT_KAFKA_VERSION} is running: 1 node(s)" in text
        assert f"export HEAPSYNC_KAFKA_BOOTSTRAP=127.0.0.1:{port}\n" in text
        md = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=30)
        assert list(md.brokers) == [1]
        java_pid = int(text.split(" pid ")[1].split()[0])
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, out.read_text()
    assert "stopped" in out.read_text()
    assert not alive(java_pid)


@pytest.mark.integration
def test_fetch_is_resolved_once_and_reused(kafka_tier: None) -> None:
    home = fetch(DEFAULT_KAFKA_VERSION)
    assert (home / "libs" / f"kafka_2.13-{DEFAULT_KAFKA_VERSION}.jar").exists()
    stamp = (home / "complete").stat().st_mtime_ns
    assert fetch(DEFAULT_KAFKA_VERSION) == home and (home / "complete").stat().st_mtime_ns == stamp


class _Config:
    def __init__(self, option: str | None) -> None:
        self.option = option

    def getoption(self, _name: str) -> str | None:
        return self.option


def test_the_tier_runs_on_both_brokers_when_java_and_maven_are_there(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import conftest

    for name in (conftest.BROKERS_ENV, conftest.REQUIRE_KAFKA_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(conftest, "missing_tools", lambda: [])
    assert conftest.selected_brokers(_Config(None)) == (["tansu", "kafka"], None)  # type: ignore[arg-type]
    assert conftest.selected_brokers(_Config("kafka")) == (["kafka"], None)  # type: ignore[arg-type]
    monkeypatch.setenv(conftest.BROKERS_ENV, "tansu")
    assert conftest.selected_brokers(_Config(None)) == (["tansu"], None)  # type: ignore[arg-type]

    monkeypatch.delenv(conftest.BROKERS_ENV)
    monkeypatch.setattr(conftest, "missing_tools", lambda: ["mvn"])
    brokers, note = conftest.selected_brokers(_Config(None))  # type: ignore[arg-type]
    assert brokers == ["tansu"] and note is not None
    assert note.startswith("Apache Kafka tier skipped: mvn not on PATH")
    monkeypatch.setenv(conftest.REQUIRE_KAFKA_ENV, "1")  # CI: never skipped, a clear failure instead
    with pytest.raises(pytest.UsageError, match="mvn not on PATH"):
        conftest.selected_brokers(_Config(None))  # type: ignore[arg-type]
