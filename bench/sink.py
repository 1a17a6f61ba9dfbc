"""Sink benchmark: how close the Cordial sink gets to the rate limit Cordial allows.

Runs a broker (Tansu, or a single-node Apache Kafka; ``--broker both`` runs everything on each), the
Cordial simulator (10 ms latency per request, a per-key rate limit of N requests/s) and the sink as
real processes, and produces deltas straight into the deltas topic. The ceiling is the configured limit N; a
calibration run without any limit first shows the machine can drive more than N
(so the limit, not the CPU, binds). Phases:

1. calibration: 20,000 operations, no limit anywhere: the machine's own ceiling.
2. rest: 100,000 operations (20 deltas of 5,000 over 4 lists) at limit N.
3. outage: the same volume with a 30 s outage of the simulator in the middle.
4. bulk: a 1,000,000-user delta (200 chunks of 5,000) through contact imports.

``python -m bench sink [--broker tansu|kafka|both]`` (``HEAPSYNC_BENCH_SINK_LIMIT`` or ``--limit`` sets N, default
1000, where the limit binds on 2 shared cores; ``HEAPSYNC_BENCH_SINK_SKIP`` or ``--skip`` skips phases by name, comma
separated). Each phase also reports the sink's and the broker's CPU per operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from bench.brokers import (
    add_broker_argument,
    broker_pid,
    brokers_from_args,
    cpu_seconds,
    idle_cpu_note,
    label,
    load_average,
    open_broker,
    run_each,
)
from heapsync.contracts import Delta
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from heapsync_dev.processes import die_with_parent, free_port, stop_process, wait_for_port

LATENCY = 0.01
CHUNK = 5000


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class Bench:
    def __init__(self, broker: Any, workdir: Path, limit: int) -> None:
        self.broker = broker
        self.workdir = workdir
        self.limit = limit
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker_pid = broker_pid(broker)
        self.sink_pid = 0
        self.settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=self.prefix, topic_partitions=3)
        ensure_topics(self.settings)
        self.producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                                  "linger.ms": 20, "compression.type": "lz4", "message.max.bytes": 16 << 20})
        accounts = self.workdir / "accounts.toml"
        accounts.write_text(
            "[accounts.calib]\nheap_webhook_secrets = ['calib-webhook-secret']\ncordial_api_key = 'calib-key'\n"
            f"cordial_base_url = '{self.sim_url}/v2'\nmax_concurrency = 64\nrate_limit_per_second = 1000000\n"
            "[accounts.bench]\nheap_webhook_secrets = ['bench-webhook-secret']\ncordial_api_key = 'bench-key'\n"
            f"cordial_base_url = '{self.sim_url}/v2'\nmax_concurrency = 64\nrate_limit_per_second = {limit}\n"
        )
        self.env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": broker.bootstrap, "HEAPSYNC_TOPIC_PREFIX": self.prefix,
                    "HEAPSYNC_TOPIC_PARTITIONS": "3", "HEAPSYNC_ACCOUNTS_FILE": str(accounts),
                    "HEAPSYNC_SINK_GROUP": f"{self.prefix}-sink", "HEAPSYNC_LOG_LEVEL": "WARNING"}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "heapsync_ops.cli", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):  # one by one: the sink goes before what it talks to
            stop_process(proc, 30)
        self.producer.flush(10)

    def state(self) -> dict[str, Any]:
        return _get(f"{self.sim_url}/_sim/state")

    def members(self, account: str) -> int:
        return sum(self.state()["accounts"][account]["lists"].values())

    def produce(self, deltas: list[Delta]) -> None:
        for d in deltas:
            self.producer.produce(self.settings.topics.deltas, d.model_dump_json().encode(),
                                  key=f"{d.account}:{d.list_name}".encode())
            self.producer.poll(0)
        assert self.producer.flush(60) == 0

    @staticmethod
    def deltas(account: str, tag: str, total: int, lists: int) -> list[Delta]:
        out = []
        per_list = total // lists
        for li in range(lists):
            name = f"{tag}List{li}"
            for start in range(0, per_list, CHUNK):
                ids = [f"{tag}-{li}-{i}@example.com" for i in range(start, min(start + CHUNK, per_list))]
                out.append(Delta(delta_id=uuid.uuid4().hex, account=account, segment_id=name, segment_name=name,
                                 list_name=name, identity_field="email", kind="sync", add=ids))
        return out

    def wait_members(self, account: str, target: int, timeout: float, poll: float = 0.2,
                     on_half: Any = None, half: int = 0) -> tuple[float | None, float | None]:
        """(time the first member appeared, time all ``target`` were there), by polling the simulator."""
        first = done = None
        deadline = time.monotonic() + timeout
        half_fired = False
        while time.monotonic() < deadline:
            n = self.members(account)
            now = time.monotonic()
            if first is None and n > 0:
                first = now
            if on_half is not None and not half_fired and n >= half:
                on_half()
                half_fired = True
            if n >= target:
                done = now
                break
            time.sleep(poll)
        return first, done

    def cpu(self) -> tuple[float, float]:
        """(sink, broker) CPU seconds so far."""
        return cpu_seconds(self.sink_pid), cpu_seconds(self.broker_pid)

    def cpu_note(self, since: tuple[float, float], ops: int) -> str:
        """CPU per operation since ``since`` (sink, broker), and the load average now."""
        sink, broker = (now - then for now, then in zip(self.cpu(), since))
        return (f"CPU per op: sink {sink / ops * 1e6:.0f} µs, broker {broker / ops * 1e6:.0f} µs; "
                f"load average {load_average()}")

    def timed_phase(self, account: str, tag: str, n: int, timeout: float) -> tuple[float, str]:
        """Produce ``n`` operations (4 lists) for a fresh ``account``: seconds from first to last member seen,
        and the CPU per operation it took."""
        since = self.cpu()
        self.produce(self.deltas(account, tag, n, 4))
        first, done = self.wait_members(account, n, timeout)
        assert first and done, f"{tag} phase did not finish"
        return done - first, self.cpu_note(since, n)

    def dead_letters(self) -> int:
        topic = self.settings.topics.sink_dlq
        c = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": f"r-{uuid.uuid4().hex}",
                      "enable.partition.eof": True, "enable.auto.commit": False})
        try:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            n, eof, deadline = 0, set(), time.monotonic() + 20
            while len(eof) < len(meta.partitions) and time.monotonic() < deadline:
                for m in c.consume(500, 0.5):
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            eof.add(m.partition())
                    else:
                        n += 1
            return n
        finally:
            c.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench sink",
                                     description="The Cordial sink against the rate limit it is allowed, on each broker.")
    parser.add_argument("--limit", type=int, default=int(os.environ.get("HEAPSYNC_BENCH_SINK_LIMIT", "1000")),
                        help="N, the simulator's and the account's requests/s per key (default 1000)")
    parser.add_argument("--skip", default=os.environ.get("HEAPSYNC_BENCH_SINK_SKIP", ""),
                        help="phases to skip, comma separated: calibration, rest, outage, bulk")
    add_broker_argument(parser)
    args = parser.parse_args(argv or [])
    skip = set(filter(None, args.skip.split(",")))
    run_each("sink", brokers_from_args(args.broker), lambda kind: bench_on(kind, args.limit, skip))


def bench_on(kind: str, limit: int, skip: set[str]) -> None:
    print(f"  sink on {label(kind)}: simulator latency {LATENCY * 1000:.0f} ms, rate limit N = {limit} requests/s "
          f"per key; 2 cores shared with other work", flush=True)
    with tempfile.TemporaryDirectory() as tmp, open_broker(kind, Path(tmp)) as broker:
        print(f"  {idle_cpu_note(broker)}", flush=True)
        b = Bench(broker, Path(tmp), limit)
        try:
            b.start("simulator", "simulator", "--port", str(b.sim_port), "--latency", str(LATENCY),
                    "--account", "calib=calib-key", "--account", "bench=bench-key", "--import-step", "0.2")
            wait_for_port("127.0.0.1", b.sim_port, 30)
            b.sink_pid = b.start("sink", "sink").pid
            results: dict[str, Any] = {}

            if "calibration" not in skip:
                n = 20_000
                seconds, cpu = b.timed_phase("calib", "calib", n, 300)
                machine = n / seconds
                results["calibration"] = machine
                print(f"  calibration (no limit): {n} ops in {seconds:.1f} s = {machine:,.0f} ops/s "
                      f"({machine / limit:.2f}x N: {'the limit binds' if machine > 1.1 * limit else 'CPU binds!'}); "
                      f"{cpu}", flush=True)

            _post(f"{b.sim_url}/_sim/config", {"rate_limit_per_second": limit})
            if "rest" not in skip:
                n = 100_000
                seconds, cpu = b.timed_phase("bench", "rest", n, 600)
                rate = n / seconds
                st = b.state()
                print(f"  rest: {n} ops in {seconds:.1f} s = {rate:,.0f} ops/s = {rate / limit:.1%} of N; "
                      f"429s seen: {st['rate_limited']}; {cpu}", flush=True)
                results["rest"] = rate

            if "outage" not in skip:
                n = 100_000
                before = b.members("bench")
                since = b.cpu()
                b.produce(b.deltas("bench", "outage", n, 4))
                outage_at: list[float] = []

                def outage() -> None:
                    _post(f"{b.sim_url}/_sim/outage", {"seconds": 30})
                    outage_at.append(time.monotonic())

                first, done = b.wait_members("bench", before + n, 900, on_half=outage, half=before + n // 2)
                applied = b.members("bench") - before
                dead = b.dead_letters()
                if first and done:
                    ideal = n / limit + 30
                    after = done - outage_at[0] - 30
                    print(f"  outage: {n} ops with a 30 s outage at 50%: all applied in {done - first:.1f} s "
                          f"(ideal {ideal:.1f} s at N plus the outage: {ideal / (done - first):.1%}); "
                          f"applied {applied}/{n}, dead-lettered {dead}; the second half took {after:.1f} s "
                          f"after the outage ended (ideal {n / 2 / limit:.1f} s); {b.cpu_note(since, n)}", flush=True)
                else:
                    print(f"  outage: NOT finished: applied {applied}/{n}, dead-lettered {dead}", flush=True)

            if "bulk" not in skip:
                n = 1_000_000
                delta_id = uuid.uuid4().hex
                chunks = n // CHUNK
                deltas = [Delta(delta_id=delta_id, account="bench", segment_id="big", segment_name="Big",
                                list_name="Big", identity_field="email", kind="sync", chunk=c + 1, chunks=chunks,
                                add=[f"big-{c}-{i}@example.com" for i in range(CHUNK)]) for c in range(chunks)]
                since = b.cpu()
                t0 = time.monotonic()
                b.produce(deltas)
                produced = time.monotonic()
                deadline = produced + 600
                while time.monotonic() < deadline:
                    if b.state()["accounts"]["bench"]["lists"].get("Big", 0) >= n:
                        break
                    time.sleep(0.5)
                done = time.monotonic()
                got = b.state()["accounts"]["bench"]
                print(f"  bulk: {n:,} users in {chunks} chunks: produced in {produced - t0:.1f} s, all applied "
                      f"{done - produced:.1f} s after the last chunk reached Kafka ({done - t0:.1f} s after the first); "
                      f"members {got['lists'].get('Big', 0):,}, import jobs {got['jobs']}; {b.cpu_note(since, n)}",
                      flush=True)
        finally:
            b.stop_all()


if __name__ == "__main__":
    main(sys.argv[1:])
