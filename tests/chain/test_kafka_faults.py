"""Broker faults on a replicated Apache Kafka: 3 KRaft nodes, replication 3, ``min.insync.replicas=2``.

Every test starts its own cluster (it kills brokers, so nothing is shared), makes the topics with
``heapsync topics`` and ``HEAPSYNC_TOPIC_REPLICATION=3``, and runs the real stages as processes
(ingress, Faust workers, Cordial sink, Cordial simulator). Pages go through the ingress over signed
HTTP from a load generator that behaves like Heap: it retries every non-200 answer after
``Retry-After``, a bounded number of times. Each test's docstring says what it killed, when, and
what it checked. Broker and stage logs are printed when a test fails; every process is stopped by
pid at the end, and the fixture checks that none is left.

Runs only when the Apache Kafka tier is selected (``--broker kafka|both``, ``HEAPSYNC_TEST_BROKERS``
or by default with java and mvn on PATH); with ``HEAPSYNC_TEST_REQUIRE_KAFKA=1`` it fails instead
of skipping. ``.venv/bin/pytest tests/chain/test_kafka_faults.py --broker kafka``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, ResourceType

from heapsync.contracts import AppliedChunk
from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION, KafkaCluster, KafkaUnavailable
from heapsync_dev.samples import heap_request
from tests.conftest import _BROKERS, REQUIRE_KAFKA_ENV, Pipeline, Proc
from tests.ingest_support import raw_request, read_topic, signed_headers

PRODUCE_TIMEOUT = 4.0
"""The ingress's produce timeout here: shorter than the ~9 s a killed leader takes to be fenced, so
pages sent to its partitions meanwhile come back 503 (as Heap would see) rather than waiting it out."""
ANSWER_BOUND = PRODUCE_TIMEOUT + 6.0
"""No answer may take longer than the produce timeout plus this margin (a hang is a failure)."""
PATH = "/heap/listMembership/acme"


@pytest.fixture(autouse=True)
def _kafka_tier_only(request: pytest.FixtureRequest) -> None:
    """These tests need Apache Kafka: skipped unless its tier is selected, failed if it is required."""
    if "kafka" not in request.config.stash[_BROKERS]:
        if os.environ.get(REQUIRE_KAFKA_ENV) == "1":
            pytest.fail(f"{REQUIRE_KAFKA_ENV}=1 but the Apache Kafka tier is not selected (--broker)")
        pytest.skip("the Apache Kafka tier is not selected (--broker, HEAPSYNC_TEST_BROKERS)")


pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# -- the cluster and the pipeline ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@dataclass
class Faults:
    """A fresh 3-node cluster and one heapsync deployment on it."""

    cluster: KafkaCluster
    pipeline: Pipeline

    @property
    def pages_topic(self) -> str:
        return f"{self.pipeline.prefix}.pages"

    def make_topics(self) -> list[dict[str, Any]]:
        """``heapsync topics --json`` as an operator runs it; returns its rows."""
        done = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "topics", "--json"],
                              env=self.pipeline.env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def leaders(self, topic: str, partitions: int = 3) -> dict[int, int | None]:
        return {p: self.cluster.leader(topic, p) for p in range(partitions)}

    def wait_leader_moved(self, topic: str, dead: set[int], partitions: int = 3, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = self.leaders(topic, partitions)
            if all(v is not None and v not in dead for v in leaders.values()):
                return
            time.sleep(0.5)
        raise AssertionError(f"{topic} leaders still on {dead}: {self.leaders(topic, partitions)}")

    def min_insync_replicas(self, topic: str) -> str:
        """The topic's own ``min.insync.replicas`` ("broker default" when it has none: a broker's is 1)."""
        admin = AdminClient({"bootstrap.servers": self.live_bootstrap()})
        res = ConfigResource(ResourceType.TOPIC, topic)
        entry = admin.describe_configs([res])[res].result(30)["min.insync.replicas"]
        source = getattr(entry.source, "value", entry.source)  # an enum or its int, by client version
        return str(entry.value) if source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value else "broker default"

    def live_bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.cluster.members if n.running)

    def start_simulator(self) -> Proc:
        return self.pipeline.start_simulator()


@pytest.fixture
def faults(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Faults]:
    """A fresh 3-node KRaft cluster (data kept under tmp_path so all nodes can restart on it) and a
    pipeline whose topics have 3 replicas. Prints every log when the test failed; stops everything."""
    cluster = KafkaCluster(nodes=3, data_dir=tmp_path / "kafka",
                           version=os.environ.get("HEAPSYNC_TEST_KAFKA_VERSION") or DEFAULT_KAFKA_VERSION)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        cluster.stop()
        pytest.fail(f"a 3-node Apache Kafka did not start: {exc}")
    pipeline = Pipeline(cluster, tmp_path)
    pipeline.extra_env.update({
        "HEAPSYNC_TOPIC_REPLICATION": "3",
        "HEAPSYNC_PRODUCE_TIMEOUT_SECONDS": str(PRODUCE_TIMEOUT),
        # Heap-sized syncs through Cordial's contact import, small ones through the REST API
        "HEAPSYNC_SINK_BULK_THRESHOLD": "2000",
    })
    pipeline.write_accounts(
        "[accounts.acme]\n"
        f'heap_webhook_secrets = ["{pipeline.secret}"]\n'
        f'cordial_api_key = "{pipeline.cordial_key}"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n'
        "max_concurrency = 16\n"
        "rate_limit_per_second = 1000\n"
    )
    failed_before = request.session.testsfailed
    started = time.monotonic()
    try:
        yield Faults(cluster, pipeline)
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n===== stages\n{pipeline.logs()}\n===== brokers\n{cluster.logs(8000)}")
        pids = [p.popen.pid for p in pipeline.procs] + [n.pid for n in cluster.members if n.pid is not None]
        pipeline.stop_all()
        cluster.stop()
        print(f"\n{request.node.name}: {time.monotonic() - started:.0f} s with its cluster")
        left = [pid for pid in pids if _alive(pid)]
        assert not left, f"processes left running: {left}"


# -- a Heap-like client ----------------------------------------------------------------------------


@dataclass
class Answer:
    page: str
    status: int
    seconds: float
    retry_after: str | None
    reason: str | None
    request_id: str | None
    at: float


@dataclass
class Heap:
    """Posts pages like Heap: signed, concurrent, each retried after Retry-After until 200 (bounded)."""

    pipeline: Pipeline
    max_attempts: int = 40
    answers: list[Answer] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)
    """page label -> request id of its 200."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    accepted_event: dict[int, threading.Event] = field(default_factory=dict)

    def when_accepted(self, count: int) -> threading.Event:
        """Set once ``count`` pages were answered 200 (to time a fault into the load)."""
        event = self.accepted_event.setdefault(count, threading.Event())
        if len(self.accepted) >= count:
            event.set()
        return event

    def attempt(self, label: str, page: dict[str, Any]) -> Answer:
        body = json.dumps(page).encode()
        started = time.monotonic()
        try:
            reply = raw_request(self.pipeline.ingest_port, "POST", PATH, body,
                                signed_headers(self.pipeline.secret, body), timeout=ANSWER_BOUND + 30)
            doc = reply.json if reply.raw else {}
            answer = Answer(label, reply.status, time.monotonic() - started, reply.headers.get("Retry-After"),
                            doc.get("reason"), doc.get("request_id"), started)
        except OSError as exc:  # no answer at all (a hang past the socket timeout, a reset)
            answer = Answer(label, 0, time.monotonic() - started, None, repr(exc), None, started)
        with self._lock:
            self.answers.append(answer)
            if answer.status == 200 and answer.request_id:
                self.accepted[label] = answer.request_id
                for count, event in self.accepted_event.items():
                    if len(self.accepted) >= count:
                        event.set()
        return answer

    def send(self, label: str, page: dict[str, Any]) -> bool:
        for _ in range(self.max_attempts):
            answer = self.attempt(label, page)
            if answer.status == 200:
                return True
            retry_after = answer.retry_after or ""
            time.sleep(float(retry_after) if retry_after.isdigit() else 1.0)
        return False

    def send_all(self, pages: list[tuple[str, dict[str, Any]]], threads: int = 4, pause: float = 0.0) -> list[str]:
        """Send every page (``threads`` at a time, ``pause`` between one thread's pages); returns the
        labels never accepted."""
        def lane(chunk: list[tuple[str, dict[str, Any]]]) -> list[str]:
            lost = []
            for label, page in chunk:
                if not self.send(label, page):
                    lost.append(label)
                time.sleep(pause)
            return lost

        lanes = [pages[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            return [label for lost in pool.map(lane, lanes) for label in lost]

    def in_background(self, pages: list[tuple[str, dict[str, Any]]], threads: int = 4,
                      pause: float = 0.0) -> tuple[threading.Thread, list[str]]:
        lost: list[str] = []
        thread = threading.Thread(target=lambda: lost.extend(self.send_all(pages, threads, pause)), daemon=True)
        thread.start()
        return thread, lost

    def check_answers(self) -> list[Answer]:
        """Every answer was 200 or a 503 with Retry-After, within the produce timeout's bound;
        returns the 503s."""
        odd = [a for a in self.answers if a.status not in (200, 503)]
        assert not odd, f"answers other than 200/503 (never a 500, never no answer): {odd[:5]}"
        slow = [a for a in self.answers if a.seconds > ANSWER_BOUND]
        assert not slow, f"answers past the produce timeout ({PRODUCE_TIMEOUT} s) + margin: {slow[:5]}"
        refused = [a for a in self.answers if a.status == 503]
        bad = [a for a in refused if not (a.retry_after or "").isdigit()]
        assert not bad, f"503 without Retry-After: {bad[:5]}"
        reasons = sorted({a.reason or "" for a in refused})
        print(f"\nanswers: {len(self.answers)} ({len(self.answers) - len(refused)} x 200, {len(refused)} x 503 "
              f"{reasons}), slowest {max((a.seconds for a in self.answers), default=0):.1f} s")
        return refused


# -- syncs as Heap sends them -----------------------------------------------------------------------


def users(tag: str, start: int, stop: int) -> list[str]:
    return [f"{tag}{i}@example.com" for i in range(start, stop)]


@dataclass
class Segment:
    """One Heap segment (one Cordial list) and the syncs sent for it, in order."""

    seg_id: str
    name: str
    syncs: list[list[tuple[list[str], list[str]]]] = field(default_factory=list)
    """Per sync, its pages as (add, remove)."""
    sync_ids: list[str] = field(default_factory=list)

    @property
    def list_name(self) -> str:
        return self.name.replace(" ", "")

    def add_sync(self, pages: list[tuple[list[str], list[str]]]) -> None:
        self.syncs.append(pages)
        self.sync_ids.append(f"{self.seg_id}-sync{len(self.syncs)}-{uuid.uuid4().hex[:6]}")

    def pages(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        """Sync ``index``'s pages as Heap posts them (labels name segment, sync and page)."""
        sync_id, pages = self.sync_ids[index], self.syncs[index]
        return [(f"{sync_id}/p{n}", heap_request(sync_id, n, len(pages), add=add, remove=remove,
                                                 segment_id=self.seg_id, segment_name=self.name))
                for n, (add, remove) in enumerate(pages, start=1)]

    def members(self) -> set[str]:
        """The list after every sync, applied in order (a sync nets its own pages: an id's last page wins)."""
        members: set[str] = set()
        for pages in self.syncs:
            net: dict[str, bool] = {}
            for add, remove in pages:
                net.update({i: True for i in add})
                net.update({i: False for i in remove})
            members |= {i for i, keep in net.items() if keep}
            members -= {i for i, keep in net.items() if not keep}
        return members


def page_split(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def reshuffling_segment(seg_id: str, name: str, size: int, page_size: int) -> Segment:
    """Three syncs whose result depends on their order: the second removes a tenth of the first and
    adds new ids, the third re-adds part of what the second removed and removes part of what it added."""
    seg = Segment(seg_id, name)
    base = users(f"{seg_id}.u", 0, size)
    seg.add_sync([(p, []) for p in page_split(base, page_size)])
    tenth = max(1, size // 10)
    new = users(f"{seg_id}.n", 0, tenth // 2 or 1)
    seg.add_sync([([], p) for p in page_split(base[:tenth], page_size)] + [(new, [])])
    seg.add_sync([(base[: max(1, tenth // 5)], new[: max(1, len(new) // 5)])])
    return seg


def wait_for_lists(pipeline: Pipeline, expected: dict[str, set[str]], timeout: float) -> dict[str, set[str]]:
    """Poll the simulator until every list holds exactly its expected members, or time runs out."""
    deadline = time.monotonic() + timeout
    got: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        got = {name: set(members) for name, members in pipeline.lists().items() if name in expected}
        if got == expected:
            break
        time.sleep(1.0)
    return got


def list_diff(expected: dict[str, set[str]], got: dict[str, set[str]]) -> str:
    out = []
    for name, want in expected.items():
        have = got.get(name, set())
        if have != want:
            out.append(f"{name}: {len(have)} members, {len(want)} expected, missing {len(want - have)} "
                       f"(e.g. {sorted(want - have)[:3]}), extra {len(have - want)} (e.g. {sorted(have - want)[:3]})")
    return "; ".join(out) or "equal"


def stored_request_ids(bootstrap: str, topic: str, wanted: set[str], timeout: float = 60.0) -> set[str]:
    records = read_topic(bootstrap, topic, lambda rs: wanted <= {
        r.value.get("request_id") for r in rs if isinstance(r.value, dict)}, timeout=timeout)
    return {str(r.value.get("request_id")) for r in records if isinstance(r.value, dict)}


def applied_in_order(bootstrap: str, prefix: str, segments: list[Segment], timeout: float = 60.0) -> list[str]:
    """From the sink's progress topic: for each segment, every chunk of sync k was first applied before
    any chunk of sync k+1. Returns the violations."""
    wanted = {(s.seg_id, sid) for s in segments for sid in s.sync_ids}
    records = read_topic(bootstrap, f"{prefix}.sink.progress", lambda rs: wanted <= {
        (r.value.get("segment_id"), r.value.get("sync_task_id")) for r in rs if isinstance(r.value, dict)},
        timeout=timeout)
    first: dict[str, AppliedChunk] = {}
    for r in records:
        if not isinstance(r.value, dict):
            continue
        chunk = AppliedChunk.model_validate(r.value)
        if chunk.chunk_key not in first or chunk.applied_at < first[chunk.chunk_key].applied_at:
            first[chunk.chunk_key] = chunk
    problems = []
    for seg in segments:
        times = [[c.applied_at for c in first.values() if c.sync_task_id == sid] for sid in seg.sync_ids]
        for k, sid in enumerate(seg.sync_ids):
            if not times[k]:
                problems.append(f"{sid}: no chunk applied")
        for k in range(len(times) - 1):
            if times[k] and times[k + 1] and max(times[k]) > min(times[k + 1]):
                problems.append(f"{seg.seg_id}: sync {k + 2} applied before sync {k + 1} finished")
    return problems


def start_stages(f: Faults, workers: int = 1) -> list[Proc]:
    f.pipeline.start_simulator()
    f.pipeline.start_ingest()
    stages = start_workers(f, workers)
    stages.append(f.pipeline.start("sink", "sink"))
    return stages


def start_workers(f: Faults, count: int) -> list[Proc]:
    """Faust workers in one group, each with its own state directory (as replicas on their own machines)."""
    return [f.pipeline.start("process", "process", env=f.pipeline.env(
        HEAPSYNC_PROCESSOR_DATA_DIR=str(f.pipeline.workdir / f"processor-{i}"))) for i in range(1, count + 1)]


def warm_up(f: Faults) -> dict[str, set[str]]:
    """One small sync per segment of three, through the whole chain, before any fault: every stage is
    up and connected (a worker still starting when the brokers vanish exits; its supervisor restarts
    it, which is not what these tests are about). Returns the lists they made."""
    segments = [Segment(f"warm{i}", f"Fault Warm {i}") for i in range(3)]
    for seg in segments:
        seg.add_sync([(users(f"{seg.seg_id}.u", 0, 5), [])])
    assert not Heap(f.pipeline).send_all([p for seg in segments for p in seg.pages(0)], threads=3)
    expected = {seg.list_name: seg.members() for seg in segments}
    got = wait_for_lists(f.pipeline, expected, timeout=180)
    assert got == expected, f"the chain did not start: {list_diff(expected, got)}\n{f.pipeline.logs()}"
    return expected


def assert_still_running(procs: list[Proc], pipeline: Pipeline) -> None:
    """Every stage is the process the test started: nothing crashed, nothing was restarted."""
    dead = [f"{p.name} exited {p.popen.returncode}" for p in procs if p.popen.poll() is not None]
    assert not dead, f"stages exited: {dead}\n{pipeline.logs()}"


# -- the faults ---------------------------------------------------------------------------------------


def test_leader_of_the_pages_partitions_killed_under_heap_load(faults: Faults) -> None:
    """Killed: kill -9 of the node leading the most pages partitions, once a quarter of the load's pages
    were answered 200, while 16 segments x 12 pages (50 ids each) are posted by 4 Heap-like clients.

    Checked: every answer was 200 or 503 with Retry-After (never a 500, none past the produce timeout),
    and some 503s came while leadership moved; every page ended up 200 from the same ingress process
    (no restart); with the killed node still down, every request id answered 200 is read back from
    the pages topic (so it was on the surviving in-sync replicas: acks=all, min.insync.replicas=2);
    every list in Cordial is exactly what the pages say.
    """
    f = faults
    rows = f.make_topics()
    assert rows and all(r["replication"] == 3 for r in rows), rows
    assert {r["topic"]: f.min_insync_replicas(r["topic"]) for r in rows} == {r["topic"]: "2" for r in rows}
    stages = start_stages(f)
    warm = warm_up(f)

    segments = [Segment(f"s{i}", f"Fault Leader {i}") for i in range(16)]
    for seg in segments:
        seg.add_sync([(p, []) for p in page_split(users(f"{seg.seg_id}.u", 0, 600), 50)])
    pages = [p for seg in segments for p in seg.pages(0)]
    heap = Heap(f.pipeline)
    quarter = heap.when_accepted(len(pages) // 4)
    load, lost = heap.in_background(pages, threads=4, pause=0.1)
    assert quarter.wait(120), f"no load accepted: {heap.answers[-5:]}\n{f.pipeline.logs()}"

    leaders = f.leaders(f.pages_topic)
    victim = max(set(leaders.values()), key=lambda n: list(leaders.values()).count(n))
    assert victim is not None
    f.cluster.kill(victim)
    killed_at = time.monotonic()
    load.join(600)
    assert not load.is_alive() and not lost, f"pages never accepted: {lost[:5]}"
    f.wait_leader_moved(f.pages_topic, {victim})

    refused = heap.check_answers()
    assert [a for a in refused if a.at >= killed_at - PRODUCE_TIMEOUT], (
        "no 503 while leadership moved: the kill did not reach the ingress")
    assert_still_running(stages, f.pipeline)
    assert len([p for p in f.pipeline.procs if p.name == "ingest"]) == 1

    acked = set(heap.accepted.values())
    assert len(heap.accepted) == len(pages)
    stored = stored_request_ids(f.live_bootstrap(), f.pages_topic, acked)
    assert acked <= stored, f"{len(acked - stored)} pages answered 200 are not on the surviving replicas"

    expected = {**warm, **{seg.list_name: seg.members() for seg in segments}}
    got = wait_for_lists(f.pipeline, expected, timeout=240)
    assert got == expected, list_diff(expected, got)


def test_broker_killed_while_two_workers_assemble_and_the_sink_applies(faults: Faults) -> None:
    """Killed: kill -9 of the node leading the big list's deltas partition, at the moment the sink has
    applied the first chunk of a 100,000-user sync (20 pages of 5,000) and while the next two syncs of
    that segment and of five small segments are still being posted and assembled by two Faust workers.

    Checked: every list in Cordial is exact, and each segment's three syncs, whose result depends on
    their order, were applied in order (the lists, and the sink's progress records: every chunk of sync k
    applied before the first of sync k+1); no stage exited or was restarted.
    """
    f = faults
    f.make_topics()
    f.pipeline.start_simulator("--import-step", "0.5")
    f.pipeline.start_ingest()
    stages = start_workers(f, 2)
    stages.append(f.pipeline.start("sink", "sink"))
    warm = warm_up(f)

    big = reshuffling_segment("big", "Fault Big", 100_000, 5_000)
    small = [reshuffling_segment(f"m{i}", f"Fault Small {i}", 300, 100) for i in range(5)]
    heap = Heap(f.pipeline)
    first = big.pages(0) + [p for s in small for p in s.pages(0)]
    assert not heap.send_all(first, threads=4)

    # wait until the sink applies the big sync, then kill while later syncs are in flight
    big_key = f"acme:{big.list_name}"
    deadline = time.monotonic() + 300
    partition: int | None = None
    while partition is None and time.monotonic() < deadline:
        records = read_topic(f.cluster.bootstrap, f"{f.pipeline.prefix}.sink.progress",
                             lambda rs: any(isinstance(r.value, dict) and r.value.get("list_name") == big.list_name
                                            for r in rs), timeout=5)
        if any(isinstance(r.value, dict) and r.value.get("list_name") == big.list_name for r in records):
            deltas = read_topic(f.cluster.bootstrap, f"{f.pipeline.prefix}.deltas",
                                lambda rs: any(r.key == big_key.encode() for r in rs), timeout=30)
            partition = next(r.partition for r in deltas if r.key == big_key.encode())
    assert partition is not None, f"the sink applied nothing of the big sync\n{f.pipeline.logs()}"
    later = big.pages(1) + big.pages(2) + [p for s in small for p in s.pages(1) + s.pages(2)]
    load, lost = heap.in_background(later, threads=2, pause=0.05)
    victim = f.cluster.leader(f"{f.pipeline.prefix}.deltas", partition)
    assert victim is not None
    f.cluster.kill(victim)
    load.join(600)
    assert not load.is_alive() and not lost, f"pages never accepted: {lost[:5]}"
    heap.check_answers()

    expected = {**warm, **{s.list_name: s.members() for s in [big, *small]}}
    got = wait_for_lists(f.pipeline, expected, timeout=420)
    assert got == expected, list_diff(expected, got)
    assert_still_running(stages, f.pipeline)
    changelogs = [t for t in AdminClient({"bootstrap.servers": f.live_bootstrap()}).list_topics(timeout=30).topics
                  if t.startswith(f"{f.pipeline.prefix}-assembler-") and t.endswith("-changelog")]
    assert len(changelogs) == 5 and all(f.min_insync_replicas(t) == "2" for t in changelogs), changelogs
    assert applied_in_order(f.live_bootstrap(), f.pipeline.prefix, [big, *small]) == []


def test_every_broker_stopped_mid_sync_and_started_on_the_same_data(faults: Faults) -> None:
    """Stopped: all three nodes (SIGTERM, side by side) once a third of three 30-page syncs were answered
    200; started again on the same data after the clients had met the outage (about 10 s).

    Checked: while the brokers were away the ingress answered 503 with Retry-After (never 200, never a
    500, never past the produce timeout); every page answered 200 before the stop is in the pages topic
    after it; the ingress, the worker and the sink reconnected by themselves (same processes, none
    exited); every list in Cordial is exact.
    """
    f = faults
    f.make_topics()
    stages = start_stages(f)
    warm = warm_up(f)
    segments = [Segment(f"a{i}", f"Fault Outage {i}") for i in range(3)]
    for seg in segments:
        seg.add_sync([(p, []) for p in page_split(users(f"{seg.seg_id}.u", 0, 3000), 100)])
    pages = [p for seg in segments for p in seg.pages(0)]
    heap = Heap(f.pipeline)
    third = heap.when_accepted(len(pages) // 3)
    load, lost = heap.in_background(pages, threads=3, pause=0.2)
    assert third.wait(120), f"no load accepted: {heap.answers[-5:]}\n{f.pipeline.logs()}"

    before_stop = dict(heap.accepted)
    f.cluster.stop()  # data_dir is ours: kept
    stopped_at = time.monotonic()
    while not [a for a in heap.answers if a.status == 503 and a.at > stopped_at] and time.monotonic() - stopped_at < 60:
        time.sleep(0.5)
    time.sleep(3)
    down = [a for a in heap.answers if stopped_at < a.at and a.at + a.seconds < time.monotonic()]
    for n in f.cluster.members:
        f.cluster.start_node(n.node_id, wait=False)
    f.cluster.wait_ready(120)

    load.join(600)
    assert not load.is_alive() and not lost, f"pages never accepted: {lost[:5]}"
    heap.check_answers()
    assert down and all(a.status == 503 for a in down), [(a.status, a.reason) for a in down][:5]
    stored = stored_request_ids(f.cluster.bootstrap, f.pages_topic, set(before_stop.values()))
    assert set(before_stop.values()) <= stored, "pages answered 200 before the stop are gone"

    expected = {**warm, **{seg.list_name: seg.members() for seg in segments}}
    got = wait_for_lists(f.pipeline, expected, timeout=300)
    assert got == expected, list_diff(expected, got)
    assert_still_running(stages, f.pipeline)


def test_two_brokers_down_the_ingress_refuses_instead_of_acknowledging(faults: Faults) -> None:
    """Killed: kill -9 of two of the three nodes (below min.insync.replicas=2, and the controller quorum
    gone); started one of them again after six pages were refused.

    Checked: with two down, every page (one per segment, so every pages partition) was answered 503 with
    Retry-After within the produce timeout's bound, never 200; once a node was back the same ingress
    answered 200 again without a restart, and those pages are in the pages topic.
    """
    f = faults
    f.make_topics()
    ingest = f.pipeline.start_ingest()
    heap = Heap(f.pipeline)
    warm = [(f"w{i}", heap_request(f"w{i}", 1, 1, add=[f"w{i}@example.com"], segment_id=f"w{i}")) for i in range(6)]
    assert not heap.send_all(warm, threads=3)

    first, second = 1, 2
    f.cluster.kill(first)
    f.cluster.kill(second)
    down = [heap.attempt(f"d{i}", heap_request(f"d{i}", 1, 1, add=[f"d{i}@example.com"], segment_id=f"d{i}"))
            for i in range(6)]
    assert [a.status for a in down] == [503] * 6, [(a.status, a.reason) for a in down]
    heap.check_answers()

    f.cluster.start_node(first, wait=False)
    f.cluster.wait_ready(120, [first])
    back = [(f"b{i}", heap_request(f"b{i}", 1, 1, add=[f"b{i}@example.com"], segment_id=f"b{i}")) for i in range(6)]
    heap.max_attempts = 20
    assert not heap.send_all(back, threads=3), heap.answers[-5:]
    heap.check_answers()
    assert ingest.popen.poll() is None
    acked = {heap.accepted[label] for label, _ in back}
    assert acked <= stored_request_ids(f.live_bootstrap(), f.pages_topic, acked)
