"""Assembler benchmark: a 1,000,000-user initial sync (1,000 pages of 1,000 ids) through the real worker.

Run: ``.venv/bin/python -m bench assembler [--broker tansu|kafka|both] [--rounds N]`` (``make bench``
runs every benchmark; ``--help`` lists the options).

1. A broker (Tansu in memory, or a single-node Apache Kafka; each in turn with ``--broker both``);
   a real ``heapsync process`` worker (default store, RocksDB) is started and warmed up with a
   one-page sync.
2. The 1,000 pages are produced into the pages topic as the ingress writes them
   (``PageRecord`` JSON, key account+segment). Measured: time from the first page
   produced to the last delta chunk read back (ids/s), time from the last page
   acknowledged by the broker to the last chunk out, the worker's peak RSS.
3. Ceiling, same run, same pages into a fresh topic: a plain confluent-kafka
   consumer in its own process reading them and building the same net add and
   remove sets in Python, measured the same way (first page produced -> sets built).
4. CPU per 1,000 ids over each round (process CPU time, all threads): the worker's, the ceiling
   consumer's, and the broker's while each ran, which do not depend on how loaded the machine is.

Targets (issue 4): >= 50% of the ceiling's ids/s; last chunk <= 5 s after the last
page; worker peak RSS < 400 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PAGES = int(os.environ.get("BENCH_ASSEMBLER_PAGES", "1000"))
PER_PAGE = int(os.environ.get("BENCH_ASSEMBLER_PER_PAGE", "1000"))
PARTITIONS = 3
ACCOUNT = "bench"
SEGMENT = "777"


def build_pages(sync_id: str) -> list[bytes]:
    from heapsync.contracts import PageRecord
    from heapsync_dev.samples import heap_request

    out = []
    for n in range(1, PAGES + 1):
        ids = [f"user{i:07d}@example.com" for i in range((n - 1) * PER_PAGE, n * PER_PAGE)]
        record = PageRecord(account=ACCOUNT, request_id=str(uuid.uuid4()), received_at=datetime.now(timezone.utc),
                            payload=heap_request(sync_id, n, PAGES, add=ids, remove=[], segment_id=SEGMENT,
                                                 segment_name="Bench Segment"))
        out.append(record.model_dump_json().encode())
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> tuple[float, float]:
    """Produce like the ingress (idempotent, acks=all); returns (first produce, last page acked) times."""
    from confluent_kafka import Producer

    from ingest.records import record_key

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 2, "compression.type": "lz4", "message.max.bytes": 16 * 1024 * 1024})
    acked: list[float] = []
    key = record_key(ACCOUNT, SEGMENT)
    t0 = time.time()
    for v in values:
        while True:
            try:
                producer.produce(topic, v, key=key, on_delivery=lambda err, msg: acked.append(time.time()))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60) != 0 or len(acked) != len(values):
        raise RuntimeError("pages were not all acknowledged")
    return t0, max(acked)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class DeltaWatcher(threading.Thread):
    """Reads the deltas topic in a thread; notes when each delta's last missing chunk arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                  "fetch.max.bytes": 64 * 1024 * 1024})
        self.consumer.subscribe([topic])
        self.chunks: dict[str, set[int]] = {}
        self.done_at: dict[str, float] = {}
        self.ids: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import orjson

        while not self.stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            d = orjson.loads(msg.value())
            seen = self.chunks.setdefault(d["delta_id"], set())
            if d["chunk"] not in seen:
                seen.add(d["chunk"])
                self.ids[d["delta_id"]] = self.ids.get(d["delta_id"], 0) + len(d["add"]) + len(d["remove"])
            if len(seen) == d["chunks"] and d["delta_id"] not in self.done_at:
                self.done_at[d["delta_id"]] = time.time()
        self.consumer.close()

    def wait(self, delta_id: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while delta_id not in self.done_at:
            if time.monotonic() > deadline:
                raise TimeoutError(f"delta {delta_id} incomplete after {timeout}s: {len(self.chunks.get(delta_id, ()))} chunks")
            time.sleep(0.02)
        return self.done_at[delta_id]


def ceiling_main() -> None:
    """The ceiling, in its own process: read the pages, build the net add/remove sets, print when done."""
    import orjson
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    bootstrap, topic, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ceiling-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    consumer.poll(0.5)
    print("ready", flush=True)
    cpu0 = time.process_time()
    received: dict[int, tuple[list[str], list[str]]] = {}
    while len(received) < pages:
        for msg in consumer.consume(500, 0.1):
            if msg.error():
                continue
            data = orjson.loads(msg.value())["payload"]["data"]
            received[data["sync_info"]["page_number"]] = (
                [m["id"] for m in data.get("add") or ()], [m["id"] for m in data.get("remove") or ()])
    state: dict[str, bool] = {}
    for n in sorted(received):
        add, remove = received[n]
        state.update(dict.fromkeys(add, True))
        state.update(dict.fromkeys(remove, False))
    adds = {i for i, member in state.items() if member}
    removes = {i for i, member in state.items() if not member}
    print(f"done {time.time():.6f} {len(adds) + len(removes)} {peak_rss_mb(os.getpid()):.1f} "
          f"{time.process_time() - cpu0:.3f}", flush=True)
    consumer.close()


def run_ceiling(bootstrap: str, prefix: str, pages: list[bytes],
                broker_process: int) -> tuple[float, float, float, float, float]:
    """One ceiling round on a fresh topic: (seconds first page produced -> sets built, lag after last page, RSS,
    the consumer's CPU seconds, the broker's CPU seconds over the round)."""
    from bench.brokers import cpu_seconds
    from heapsync.kafka import ensure_topics
    from heapsync.settings import Settings
    from heapsync_dev.processes import die_with_parent

    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, topic_partitions=PARTITIONS)
    ensure_topics(settings)
    ceiling = subprocess.Popen([sys.executable, "-c", "from bench.assembler import ceiling_main; ceiling_main()",
                                bootstrap, settings.topics.pages, str(PAGES)],
                               stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    assert ceiling.stdout is not None
    if ceiling.stdout.readline().strip() != "ready":
        raise RuntimeError("ceiling consumer did not start")
    bcpu0 = cpu_seconds(broker_process)
    t0, last_page = produce(bootstrap, settings.topics.pages, pages)
    _, done_at, ids, rss, cpu = ceiling.stdout.readline().split()
    broker_cpu = cpu_seconds(broker_process) - bcpu0
    ceiling.wait(30)
    if int(ids) != PAGES * PER_PAGE:
        raise RuntimeError(f"ceiling built {ids} ids")
    return float(done_at) - t0, float(done_at) - last_page, float(rss), float(cpu), broker_cpu


def main(argv: list[str] | None = None) -> None:
    import argparse

    from bench.brokers import add_broker_argument, brokers_from_args, run_each

    parser = argparse.ArgumentParser(
        prog="python -m bench assembler",
        description=f"A {PAGES * PER_PAGE:,}-user sync ({PAGES} pages of {PER_PAGE} ids) through the real worker "
                    "against a raw confluent-kafka consumer on the same broker (BENCH_ASSEMBLER_PAGES, "
                    "BENCH_ASSEMBLER_PER_PAGE set the size).")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ASSEMBLER_ROUNDS", "3")),
                        help="syncs per broker, each after its own ceiling round (default 3)")
    parser.add_argument("--declare-first", action="store_true",
                        help="start the worker once until it has declared its changelog topics, stop it, and measure "
                             "a second start (a deployment's steady state; a first start on a fresh Apache Kafka "
                             "crashes the worker's agent, see BENCHMARKS.md)")
    add_broker_argument(parser)
    args = parser.parse_args(argv or [])
    run_each("assembler", brokers_from_args(args.broker),
             lambda kind: bench_on(kind, args.rounds, args.declare_first))


def changelog_topics(bootstrap: str, group: str) -> set[str]:
    """The worker's table changelog topics that exist on the broker now."""
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return {t for t in topics if t.startswith(f"{group}-") and t.endswith("-changelog")}


def declare_first(cmd: list[str], env: dict[str, str], log: Any, bootstrap: str, group: str,
                  tables: int = 5) -> None:
    """Run the worker until its ``tables`` changelog topics exist, then stop it (what a second start finds)."""
    from heapsync_dev.processes import die_with_parent, stop_process

    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 180
        while len(changelog_topics(bootstrap, group)) < tables:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the worker did not declare its changelog topics: "
                                   f"{sorted(changelog_topics(bootstrap, group))}")
            time.sleep(0.5)
    finally:
        stop_process(proc, 30)
    print(f"  worker started once and stopped: it declared {sorted(changelog_topics(bootstrap, group))}",
          flush=True)


def bench_on(kind: str, rounds: int, declare: bool = False) -> None:
    """Warm the worker up, then ``rounds`` times: the ceiling on a fresh topic, the worker on the pages topic."""
    from bench.brokers import broker_pid, cpu_seconds, idle_cpu_note, label, load_average, open_broker
    from heapsync.contracts import PageRecord, delta_id_for
    from heapsync.kafka import ensure_topics
    from heapsync.settings import Settings
    from heapsync_dev.processes import die_with_parent, stop_process
    from heapsync_dev.samples import heap_request

    total_ids = PAGES * PER_PAGE
    results: list[tuple[float, float, float, float]] = []  # worker s, worker lag, ceiling s, ceiling lag
    cpus: list[tuple[float, float, float, float]] = []  # worker, its broker, ceiling, its broker (CPU s per round)
    with tempfile.TemporaryDirectory(prefix="bench-assembler-") as tmp, open_broker(kind, Path(tmp)) as broker:
        print(f"  broker: {label(kind)}; {idle_cpu_note(broker)}", flush=True)
        broker_process = broker_pid(broker)
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix, topic_partitions=PARTITIONS)
        ensure_topics(settings)
        env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": broker.bootstrap, "HEAPSYNC_TOPIC_PREFIX": prefix,
               "HEAPSYNC_TOPIC_PARTITIONS": str(PARTITIONS), "HEAPSYNC_PROCESSOR_GROUP": f"{prefix}-assembler",
               "HEAPSYNC_PROCESSOR_DATA_DIR": str(Path(tmp) / "processor"),
               "HEAPSYNC_LOG_LEVEL": os.environ.get("BENCH_ASSEMBLER_LOG_LEVEL", "WARNING")}
        worker_log = open(Path(tmp) / "worker.log", "wb")
        profile = os.environ.get("BENCH_ASSEMBLER_PROFILE")  # a path: write the worker's cProfile there
        wrap = ["-m", "cProfile", "-o", profile] if profile else []
        if declare:
            declare_first([sys.executable, "-m", "heapsync_ops.cli", "process"], env, worker_log, broker.bootstrap,
                          env["HEAPSYNC_PROCESSOR_GROUP"])
        worker = subprocess.Popen([sys.executable, *wrap, "-m", "heapsync_ops.cli", "process"], env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        watcher = DeltaWatcher(broker.bootstrap, settings.topics.deltas)
        watcher.start()
        try:
            warm = str(uuid.uuid4())
            warm_page = PageRecord(account=ACCOUNT, request_id="warm", received_at=datetime.now(timezone.utc),
                                   payload=heap_request(warm, 1, 1, add=["warm@example.com"], segment_id="1"))
            t = time.time()
            produce(broker.bootstrap, settings.topics.pages, [warm_page.model_dump_json().encode()])
            watcher.wait(delta_id_for(ACCOUNT, warm), timeout=180)
            print(f"  worker ready after {time.time() - t:.1f} s (group join, recovery); "
                  f"{PAGES} pages of {PER_PAGE} ids per sync, {rounds} rounds")
            for r in range(1, rounds + 1):
                sync = str(uuid.uuid4())
                pages = build_pages(sync)
                c_seconds, c_lag, c_rss, c_cpu, c_bcpu = run_ceiling(broker.bootstrap, f"{prefix}c{r}", pages,
                                                                     broker_process)
                wcpu0, bcpu0 = cpu_seconds(worker.pid), cpu_seconds(broker_process)
                t0, last_page = produce(broker.bootstrap, settings.topics.pages, pages)
                last_chunk = watcher.wait(delta_id_for(ACCOUNT, sync), timeout=600)
                w_cpu, w_bcpu = cpu_seconds(worker.pid) - wcpu0, cpu_seconds(broker_process) - bcpu0
                cpus.append((w_cpu, w_bcpu, c_cpu, c_bcpu))
                got = watcher.ids[delta_id_for(ACCOUNT, sync)]
                if got != total_ids:
                    raise RuntimeError(f"delta has {got} ids, expected {total_ids}")
                chunks = len(watcher.chunks[delta_id_for(ACCOUNT, sync)])
                results.append((last_chunk - t0, last_chunk - last_page, c_seconds, c_lag))
                print(f"  round {r}: assembler {total_ids / (last_chunk - t0):,.0f} ids/s "
                      f"({last_chunk - t0:.2f} s first page produced -> last of {chunks} chunks out, "
                      f"{last_chunk - last_page:.2f} s after last page); ceiling {total_ids / c_seconds:,.0f} ids/s "
                      f"({c_seconds:.2f} s, sets built {c_lag:.2f} s after last page, RSS {c_rss:.0f} MB); "
                      f"ratio {c_seconds / (last_chunk - t0):.0%}; CPU per 1,000 ids: worker "
                      f"{w_cpu / total_ids * 1e6:.1f} ms (broker {w_bcpu / total_ids * 1e6:.1f} ms), ceiling "
                      f"{c_cpu / total_ids * 1e6:.1f} ms (broker {c_bcpu / total_ids * 1e6:.1f} ms); "
                      f"load average {load_average()}", flush=True)
            rss = peak_rss_mb(worker.pid)
        except Exception:
            worker_log.flush()
            errors = [line for line in (Path(tmp) / "worker.log").read_text(errors="replace").splitlines()
                      if '"level":"error"' in line or '"level":"critical"' in line]
            for line in errors[-3:]:  # why the worker did not deliver, before its folder goes
                print(f"  worker: {line[:600]}", flush=True)
            raise
        finally:
            watcher.stop.set()
            stop_process(worker, 30)
            watcher.join(5)
            worker_log.close()
            if os.environ.get("BENCH_ASSEMBLER_KEEP_LOG"):
                Path(os.environ["BENCH_ASSEMBLER_KEEP_LOG"]).write_bytes((Path(tmp) / "worker.log").read_bytes())

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    best_worker = min(r[0] for r in results)
    best_ceiling = min(r[2] for r in results)
    worst_lag = max(r[1] for r in results)
    print(f"  assembler best: {total_ids / best_worker:,.0f} ids/s; last chunk after last page: worst "
          f"{worst_lag:.2f} s (target <= 5 s); worker peak RSS {rss:.0f} MB (target < 400 MB)")
    print(f"  ceiling best:   {total_ids / best_ceiling:,.0f} ids/s (plain confluent-kafka consumer, same pages)")
    print(f"  ratio (best to best): {best_ceiling / best_worker:.0%} of ceiling (target >= 50%); "
          f"median of rounds {median([r[2] / r[0] for r in results]):.0%}")
    per_k = 1e6 / total_ids
    print(f"  CPU per 1,000 ids (median of rounds): worker {median([c[0] for c in cpus]) * per_k:.1f} ms + broker "
          f"{median([c[1] for c in cpus]) * per_k:.1f} ms; ceiling {median([c[2] for c in cpus]) * per_k:.1f} ms + "
          f"broker {median([c[3] for c in cpus]) * per_k:.1f} ms ({label(kind)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
