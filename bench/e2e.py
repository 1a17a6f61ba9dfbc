"""End-to-end benchmark: signed Heap pages -> ingress -> worker -> sink -> Cordial simulator (contact imports).

    python -m bench e2e                         # 1,000,000 users (make bench runs this)
    python -m bench e2e --users 10000000        # 10M (or HEAPSYNC_BENCH_E2E_USERS=10000000 make bench)
    python -m bench e2e --scale-out             # many large segments: 1 worker + 1 sink vs 2 + 2
    python -m bench e2e --scale-out --stages    # the same, each stage alone on a backlog already on its topic
    python -m bench e2e --users 20000 --quick   # a smoke run: no ceilings

Every stage is the real process as deployed (``heapsync ingest``, ``heapsync process``, ``heapsync sink``,
``heapsync simulator``) on the embedded Tansu broker (``--broker kafka`` for a single-node Apache Kafka). A
poster process signs and posts an initial sync of N users (pages of 1,000 ids) to the ingress, then a follow-up
that removes 30% of them and adds 30% new ones. Per sync it reports:

- end-to-end seconds: first page posted -> the last chunk's contact import done (the sink's progress record),
  then checked exactly: the simulator's members of the list are exactly the expected set;
- last page answered -> last delta chunk on the deltas topic, and last chunk -> last import done;
- each process's peak RSS (VmHWM, reset before each sync) and CPU-seconds per million ids posted;
- the ceilings: a raw confluent-kafka consumer reading the same pages from the pages topic and netting them, and
  the simulator's own CPU to import the same rows (its ``_import_rows``, in this process, without its job steps).

The machine is shared: CPU-seconds per million ids are the figures to compare across runs, with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ACCOUNT = "bench"
SECRET = "bench-webhook-secret"
API_KEY = "bench-key"
PAGE = 1000
CHURN = 0.3
USERS_ENV = "HEAPSYNC_BENCH_E2E_USERS"
PARTITIONS = 6


# ---------------------------------------------------------------- what is posted (pure)


@dataclass(frozen=True)
class SyncPlan:
    """One sync of one segment: ``initial`` adds users [0, users); ``followup`` removes the first ``churn`` share
    and adds as many new ones [users, users + churn*users)."""

    sync_id: str
    segment: str
    kind: str
    users: int
    account: str = ACCOUNT

    @property
    def changed(self) -> int:
        return round(self.users * CHURN)

    @property
    def pages(self) -> int:
        if self.kind == "initial":
            return math.ceil(self.users / PAGE)
        return math.ceil(self.changed / (PAGE // 2))

    @property
    def ids(self) -> int:
        """Ids posted in this sync (what CPU-per-million is per)."""
        return self.users if self.kind == "initial" else 2 * self.changed

    def page(self, n: int) -> tuple[list[str], list[str]]:
        """(add, remove) of page ``n`` (1-based)."""
        if self.kind == "initial":
            return [user_id(self.segment, i) for i in range((n - 1) * PAGE, min(n * PAGE, self.users))], []
        half = PAGE // 2
        lo, hi = (n - 1) * half, min(n * half, self.changed)
        return ([user_id(self.segment, self.users + i) for i in range(lo, hi)],
                [user_id(self.segment, i) for i in range(lo, hi)])

    def expected(self) -> set[str]:
        """The list's members once this sync (after the initial one, for a follow-up) is applied."""
        if self.kind == "initial":
            return {user_id(self.segment, i) for i in range(self.users)}
        return {user_id(self.segment, i) for i in range(self.changed, self.users + self.changed)}


def secret_of(account: str) -> str:
    """Each account's own webhook secret (the accounts file refuses two accounts sharing one)."""
    return SECRET if account == ACCOUNT else f"{SECRET}-{account}"


def accounts_toml(simulators: dict[str, str]) -> str:
    """The accounts file: each account (its simulator's URL) with its own secret, Cordial at its own simulator."""
    return "".join(f"[accounts.{a}]\nheap_webhook_secrets = ['{secret_of(a)}']\ncordial_api_key = '{API_KEY}'\n"
                   f"cordial_base_url = '{url}/v2'\nmax_concurrency = 64\nrate_limit_per_second = 1000000\n"
                   for a, url in simulators.items())


def user_id(segment: str, i: int) -> str:
    return f"s{segment}u{i:08d}@e2e.example.com"


def segment_name(segment: str) -> str:
    return f"E2E Segment {segment}"


def list_name(segment: str) -> str:
    """The Cordial list the sink writes (the processors' naming: whitespace removed)."""
    return "".join(segment_name(segment).split())


def interleave(plans: list[SyncPlan]) -> Iterator[tuple[SyncPlan, int]]:
    """Every (plan, page) once, the syncs' pages round-robin, so many segments are posted at the same time."""
    for n in range(1, max(p.pages for p in plans) + 1):
        for p in plans:
            if n <= p.pages:
                yield p, n


def spread_segments(count: int, partitions: int) -> list[str]:
    """``count`` segment ids of the bench account whose pages land on different partitions of the pages topic and
    whose deltas on different partitions of the deltas topic, where the partitions allow it."""
    return [seg for _, seg in spread_keys(count, partitions)]


def spread_keys(count: int, partitions: int, own_accounts: bool = False) -> list[tuple[str, str]]:
    """``count`` (account, segment) pairs spread like :func:`spread_segments` (the ingress keys a page by
    account:segment, hashed with CRC32 by librdkafka; the worker keys a delta by account:list, murmur2); with
    ``own_accounts`` each segment belongs to an account of its own (``bench1``, ``bench2``...)."""

    def fits(used: dict[int, int], p: int) -> bool:
        return used.get(p, 0) < math.ceil(count / partitions) and (used.get(p, 0) == 0 or len(used) >= partitions)

    chosen: list[tuple[str, str]] = []
    pages: dict[int, int] = {}
    deltas: dict[int, int] = {}
    n = 0
    while len(chosen) < count:
        seg = str(100 + n)
        account = f"{ACCOUNT}{len(chosen) + 1}" if own_accounts else ACCOUNT
        p = page_partition(seg, partitions, account)
        d = delta_partition(seg, partitions, account)
        if fits(pages, p) and fits(deltas, d):
            chosen.append((account, seg))
            pages[p] = pages.get(p, 0) + 1
            deltas[d] = deltas.get(d, 0) + 1
        n += 1
    return chosen


def page_partition(segment: str, partitions: int, account: str = ACCOUNT) -> int:
    """The pages topic's partition of a segment's pages (librdkafka's default partitioner: CRC32 of the key)."""
    return zlib.crc32(f"{account}:{segment}".encode()) % partitions


def delta_partition(segment: str, partitions: int, account: str = ACCOUNT) -> int:
    """The deltas topic's partition of a segment's list (the worker's Java-compatible murmur2 of account:list)."""
    from heapsync.kafka import java_partition

    return java_partition(f"{account}:{list_name(segment)}".encode(), partitions)


# ---------------------------------------------------------------- the poster (its own process)


async def post_all(url: str, plans: list[SyncPlan], concurrency: int) -> dict[str, Any]:
    """Sign and post every page to ``url``/its account, ``concurrency`` at a time; retry 429/503 (the ingress's
    back-pressure)."""
    import aiohttp
    import orjson

    from heapsync_dev.samples import heap_request
    from ingest.signature import heap_hash_header

    pages = interleave(plans)
    statuses: dict[int, int] = {}
    first = last = 0.0
    lock = asyncio.Lock()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal first, last
        while True:
            async with lock:
                nxt = next(pages, None)
            if nxt is None:
                return
            plan, n = nxt
            add, remove = plan.page(n)
            body = orjson.dumps(heap_request(plan.sync_id, n, plan.pages, add=add, remove=remove,
                                             segment_id=plan.segment, segment_name=segment_name(plan.segment)))
            for attempt in range(100):
                headers = {"Content-Type": "application/json",
                           "Heap-Hash": heap_hash_header(secret_of(plan.account).encode(), int(time.time() * 1000), body)}
                if not first:
                    first = time.time()
                async with session.post(f"{url}/{plan.account}", data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status < 300:
                        last = time.time()
                        break
                    if resp.status not in (429, 503):
                        raise RuntimeError(f"page refused: HTTP {resp.status}")
                await asyncio.sleep(min(2.0, 0.05 * (attempt + 1)))
            else:
                raise RuntimeError("page not accepted after 100 attempts")

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {"first": first, "last": last, "statuses": statuses, "cpu_s": time.process_time() - cpu0}


def run_poster(url: str, plans: list[SyncPlan], concurrency: int, env: dict[str, str]) -> dict[str, Any]:
    """The poster in a process of its own, so its CPU is not the bench's (or the stages')."""
    spec = json.dumps([p.__dict__ for p in plans])
    out = subprocess.run([sys.executable, "-m", "bench.e2e", "post", "--url", url, "--plans", spec,
                          "--concurrency", str(concurrency)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"poster failed: {out.stderr.strip()[-800:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- the raw-consumer ceiling (its own process)


def ceiling_main(bootstrap: str, topic: str, starts: dict[int, int], sync_ids: set[str], pages: int) -> None:
    """Read the pages of ``sync_ids`` from ``starts`` and net them per sync (what the worker must at least do)."""
    import orjson
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ceiling-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024})
    t0, cpu0 = time.time(), time.process_time()
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    seen: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
    while len(seen) < pages:
        for msg in consumer.consume(500, 0.1):
            if msg.error():
                continue
            data = (orjson.loads(msg.value()).get("payload") or {}).get("data") or {}
            info = data.get("sync_info") or {}  # the worker's own records on the topic (timers) have none
            if info.get("sync_task_id") in sync_ids:
                seen[(info["sync_task_id"], info["page_number"])] = (
                    [m["id"] for m in data.get("add") or ()], [m["id"] for m in data.get("remove") or ()])
    nets: dict[str, dict[str, bool]] = {}
    for (sync, _), (add, remove) in sorted(seen.items()):
        state = nets.setdefault(sync, {})
        state.update(dict.fromkeys(add, True))
        state.update(dict.fromkeys(remove, False))
    consumer.close()
    print(json.dumps({"seconds": time.time() - t0, "cpu_s": time.process_time() - cpu0,
                      "ids": sum(len(s) for s in nets.values())}), flush=True)


def run_ceiling(bootstrap: str, topic: str, starts: dict[int, int], plans: list[SyncPlan],
                env: dict[str, str]) -> dict[str, Any]:
    spec = json.dumps({"starts": starts, "syncs": [p.sync_id for p in plans], "pages": sum(p.pages for p in plans)})
    out = subprocess.run([sys.executable, "-m", "bench.e2e", "ceiling", "--bootstrap", bootstrap, "--topic", topic,
                          "--spec", spec], env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ceiling consumer failed: {out.stderr.strip()[-800:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def simulator_import_cpu(plans: list[SyncPlan], chunk: int, limit: int = 2_000_000) -> tuple[float, int]:
    """(CPU seconds, rows): the simulator's own ``_import_rows`` on the CSVs the sink renders for the same rows,
    in this process, without the job steps; at most ``limit`` rows (the caller scales linearly)."""
    from heapsync_dev.cordial_simulator import CordialSimulator, Tenant
    from sinks import cordial_import
    from sinks.operations import Operation

    sim = CordialSimulator({ACCOUNT: API_KEY})
    cpu = 0.0
    rows = 0
    for plan in plans:
        tenant = Tenant()
        tenant.lists[1] = {"id": 1, "name": list_name(plan.segment)}
        if plan.kind == "followup":  # the state the follow-up finds (not timed)
            initial = SyncPlan(plan.sync_id, plan.segment, "initial", min(plan.users, limit))
            for n in range(1, initial.pages + 1):
                sim._import_rows(tenant, _job(), _csv(initial, n, chunk=PAGE))
        ops: list[tuple[str, str]] = []
        for n in range(1, plan.pages + 1):
            add, remove = plan.page(n)
            ops.extend([(i, "remove") for i in remove] + [(i, "add") for i in add])
            if len(ops) >= limit:
                break
        ops = ops[:limit]
        for lo in range(0, len(ops), chunk):
            text = cordial_import.render_csv([Operation(kind=k, contact_id=c, identity_key="email",  # type: ignore[arg-type]
                                                        list_name=list_name(plan.segment))
                                              for c, k in ops[lo:lo + chunk]]).decode()
            c0 = time.process_time()
            sim._import_rows(tenant, _job(), text)
            cpu += time.process_time() - c0
        rows += len(ops)
    return cpu, rows


def _job() -> dict[str, Any]:
    return {"status": "Processing", "inserted": 0, "updated": 0, "rejected": 0, "errors": [], "subscribe": False}


def _csv(plan: SyncPlan, n: int, chunk: int) -> str:
    add, _ = plan.page(n)
    return "channels.email.address," + list_name(plan.segment) + "\n" + "".join(f"{i},1\n" for i in add[:chunk])


# ---------------------------------------------------------------- watching the topics


class ProgressWatcher(threading.Thread):
    """Reads the sink's progress topic: when each delta's last chunk was applied (the record's timestamp)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe([topic])
        self.chunks: dict[str, set[int]] = {}
        self.dead: dict[str, int] = {}
        self.done_at: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import orjson

        while not self.stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error() or msg.value() is None:
                continue
            d = orjson.loads(msg.value())
            seen = self.chunks.setdefault(d["delta_id"], set())
            seen.add(d["chunk"])
            self.dead[d["delta_id"]] = self.dead.get(d["delta_id"], 0) + d.get("dead_lettered", 0)
            if len(seen) == d["chunks"] and d["delta_id"] not in self.done_at:
                self.done_at[d["delta_id"]] = msg.timestamp()[1] / 1000
        self.consumer.close()

    def wait(self, delta_id: str, timeout: float, alive: Any = None) -> float:
        deadline = time.monotonic() + timeout
        while delta_id not in self.done_at:
            if time.monotonic() > deadline:
                raise TimeoutError(f"delta {delta_id[:8]} not applied after {timeout:.0f} s: "
                                   f"{len(self.chunks.get(delta_id, ()))} chunks")
            if alive is not None:
                alive()
            time.sleep(0.1)
        return self.done_at[delta_id]


# ---------------------------------------------------------------- the stack


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: ``5`` into clear_refs), so each sync's peak is its own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


@dataclass
class Stack:
    """The broker's address, the simulators and every stage as a process, with the environment they share.

    Each of ``accounts`` has a Cordial simulator process of its own (its ``cordial_base_url``), so many segments
    of many accounts are not all served by one simulator's event loop."""

    broker: Any
    workdir: Path
    workers: int = 1
    sinks: int = 1
    import_step: float = 0.0
    accounts: tuple[str, ...] = (ACCOUNT,)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, stages: bool = True) -> None:
        """The simulators and the ingress; the workers and sinks too unless ``stages`` is false (then
        :meth:`start_workers` and :meth:`start_sinks` start them later, on what is already on the topics)."""
        from heapsync.kafka import ensure_topics
        from heapsync.settings import Settings
        from heapsync_dev.processes import free_port, wait_for_port

        self.prefix = f"e2e{uuid.uuid4().hex[:8]}"
        self.sim_ports = {a: free_port() for a in self.accounts}
        self.port = free_port()
        self.settings = Settings(kafka_bootstrap=self.broker.bootstrap, topic_prefix=self.prefix,
                                 topic_partitions=PARTITIONS)
        ensure_topics(self.settings)
        accounts = self.workdir / "accounts.toml"
        accounts.write_text(accounts_toml({a: self.sim_url(a) for a in self.accounts}))
        self.env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": self.broker.bootstrap,
                    "HEAPSYNC_TOPIC_PREFIX": self.prefix, "HEAPSYNC_TOPIC_PARTITIONS": str(PARTITIONS),
                    "HEAPSYNC_ACCOUNTS_FILE": str(accounts), "HEAPSYNC_PROCESSOR_GROUP": f"{self.prefix}-assembler",
                    "HEAPSYNC_SINK_GROUP": f"{self.prefix}-sink", "HEAPSYNC_ADMIN_PORT": str(free_port()),
                    "HEAPSYNC_LOG_LEVEL": os.environ.get("BENCH_E2E_LOG_LEVEL", "WARNING"),
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for a in self.accounts:
            self._start(self.simulator_name(a), "simulator", "--port", str(self.sim_ports[a]), "--account",
                        f"{a}={API_KEY}", "--import-step", str(self.import_step))
        self._start("ingest", "ingest", "--port", str(self.port))
        if stages:
            self.start_workers()
            self.start_sinks()
        for port in (*self.sim_ports.values(), self.port):
            wait_for_port("127.0.0.1", port, 30)
        from bench.assembler import DeltaWatcher

        self.deltas = DeltaWatcher(self.broker.bootstrap, self.settings.topics.deltas)
        self.progress = ProgressWatcher(self.broker.bootstrap, self.settings.topics.sink_progress)
        self.deltas.start()
        self.progress.start()

    def _start(self, name: str, *args: str, **extra: str) -> None:
        from heapsync_dev.processes import die_with_parent

        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "heapsync_ops.cli", *args],
                                            env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=die_with_parent)

    def start_workers(self) -> None:
        for w in range(self.workers):
            self._start(f"worker{w + 1}", "process", HEAPSYNC_PROCESSOR_DATA_DIR=str(self.workdir / f"processor{w + 1}"))

    def start_sinks(self) -> None:
        for s in range(self.sinks):
            self._start(f"sink{s + 1}", "sink")

    def simulator_name(self, account: str) -> str:
        """``simulator`` (one account), else ``simulator1``, ``simulator2``... in the accounts' order."""
        return "simulator" if len(self.accounts) == 1 else f"simulator{self.accounts.index(account) + 1}"

    def sim_url(self, account: str = ACCOUNT) -> str:
        return f"http://127.0.0.1:{self.sim_ports[account]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/heap/listMembership"

    def alive(self) -> None:
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if dead:
            log = (self.workdir / f"{dead[0]}.log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"{', '.join(dead)} exited: {log[-1][:400] if log else ''}")

    def pids(self) -> dict[str, int]:
        from bench.brokers import broker_pid

        return {**{n: p.pid for n, p in self.procs.items()}, "broker": broker_pid(self.broker)}

    def signal(self, stage: str, sig: int) -> None:
        """``sig`` to every process of ``stage`` (``worker``, ``sink``): SIGSTOP pauses one, SIGCONT resumes it."""
        for name, proc in self.procs.items():
            if name.rstrip("0123456789") == stage and proc.poll() is None:
                os.kill(proc.pid, sig)

    def stop(self) -> None:
        import signal

        from heapsync_dev.processes import stop_process

        for stage in ("worker", "sink"):  # a paused process would not see its SIGTERM
            self.signal(stage, signal.SIGCONT)

        for w in (getattr(self, "deltas", None), getattr(self, "progress", None)):
            if w is not None:
                w.stop.set()
        for name in sorted(self.procs, key=lambda n: ("ingest", "worker", "sink", "simulator").index(n.rstrip("0123456789"))):
            stop_process(self.procs[name], 30)
        for w in (getattr(self, "deltas", None), getattr(self, "progress", None)):
            if w is not None:
                w.join(5)

    def members(self, account: str = ACCOUNT) -> dict[str, list[str]]:
        """The members of every list of ``account``, from its simulator."""
        import urllib.request

        with urllib.request.urlopen(f"{self.sim_url(account)}/_sim/lists", timeout=600) as resp:
            return dict(json.loads(resp.read()).get(account, {}))

    def high_watermarks(self, topic: str) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": f"hw-{uuid.uuid4().hex[:8]}"})
        try:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
        finally:
            c.close()


# ---------------------------------------------------------------- one sync, measured


def run_sync(stack: Stack, plans: list[SyncPlan], concurrency: int, timeout: float) -> dict[str, Any]:
    """Post ``plans`` at once and wait until every delta is applied; the figures of that sync."""
    from bench.brokers import cpu_seconds, load_average
    from bench.ingest import peak_rss_mb
    from heapsync.contracts import delta_id_for

    pids = stack.pids()
    for pid in pids.values():
        reset_peak_rss(pid)
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    starts = stack.high_watermarks(stack.settings.topics.pages)
    posted = run_poster(stack.url, plans, concurrency, stack.env)
    ids = [delta_id_for(p.account, p.sync_id) for p in plans]
    last_chunk = max(stack.deltas.wait(d, timeout) for d in ids)
    cpu_mid = {n: cpu_seconds(p) for n, p in pids.items()}  # the import stretch's CPU starts here
    last_import = max(stack.progress.wait(d, timeout, stack.alive) for d in ids)
    tail = {n: cpu_seconds(p) - cpu_mid[n] for n, p in pids.items()}
    cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in pids.items()}
    rss = {n: peak_rss_mb(p) for n, p in pids.items()}
    load = load_average()
    dead = sum(stack.progress.dead.get(d, 0) for d in ids)
    return {"plans": plans, "posted": posted, "starts": starts, "first": posted["first"], "last_page": posted["last"],
            "last_chunk": last_chunk, "last_import": last_import, "cpu": cpu, "tail_cpu": tail, "rss": rss,
            "load": load,
            "dead_lettered": dead, "chunks": sum(len(stack.deltas.chunks.get(d, ())) for d in ids),
            "ids": sum(p.ids for p in plans)}


def check_exact(stack: Stack, plans: list[SyncPlan]) -> str:
    """Every list's members are exactly the expected set; raises with the difference's size otherwise."""
    lists = {a: stack.members(a) for a in {p.account for p in plans}}
    for plan in plans:
        got = set(lists[plan.account].get(list_name(plan.segment), ()))
        want = plan.expected()
        if got != want:
            raise AssertionError(f"{plan.account} {list_name(plan.segment)}: {len(want - got)} missing, "
                                 f"{len(got - want)} extra of {len(want)}")
    return f"exact ({sum(len(p.expected()) for p in plans):,} memberships checked)"


def report(title: str, r: dict[str, Any], ceiling: dict[str, Any] | None, sim_cpu: tuple[float, int] | None,
           exact: str) -> None:
    """The sync's figures (and its ceilings, when given)."""
    ids = r["ids"]
    per_m = 1e6 / ids
    e2e = r["last_import"] - r["first"]
    print(f"[e2e] {title}: {ids:,} ids in {sum(p.pages for p in r['plans']):,} pages -> {r['chunks']} chunks; "
          f"end to end {e2e:.1f} s ({ids / e2e:,.0f} ids/s); {exact}; dead-lettered {r['dead_lettered']}; "
          f"load average {r['load']}", flush=True)
    print(f"  posting {r['last_page'] - r['first']:.1f} s (statuses {r['posted']['statuses']}, poster CPU "
          f"{r['posted']['cpu_s']:.1f} s); last page -> last "
          f"chunk {r['last_chunk'] - r['last_page']:.1f} s; last chunk -> last import done "
          f"{r['last_import'] - r['last_chunk']:.1f} s", flush=True)
    stretch = max(r["last_import"] - r["last_chunk"], 1e-9)
    for name in sorted(r["cpu"]):
        print(f"  {name:<10} peak RSS {r['rss'][name] or 0:7.0f} MB   CPU {r['cpu'][name] * per_m:7.1f} s per million "
              f"ids ({r['cpu'][name] / e2e:.0%} of a core over the sync, {r['tail_cpu'][name] / stretch:.0%} over the "
              "last chunk -> last import stretch)", flush=True)
    report_ceilings(r, ceiling, sim_cpu)


def report_ceilings(r: dict[str, Any], ceiling: dict[str, Any] | None, sim_cpu: tuple[float, int] | None) -> None:
    ids = r["ids"]
    per_m = 1e6 / ids
    if ceiling is not None:
        print(f"  ceiling, raw confluent-kafka consumer reading and netting the same pages: {ceiling['seconds']:.1f} s "
              f"({ceiling['cpu_s'] * per_m:.1f} CPU-s per million ids)", flush=True)
    if sim_cpu is not None:
        cpu, rows = sim_cpu
        scaled = cpu * ids / rows if rows else 0.0
        sim_used = r["cpu"].get("simulator", 0.0)
        stretch = max(r["last_import"] - r["last_chunk"], 1e-9)
        share = r["tail_cpu"].get("simulator", 0.0) / stretch
        note = f" (measured on {rows:,} rows, scaled)" if rows < ids else ""
        print(f"  ceiling, the simulator's own import of the same rows: {scaled:.1f} CPU-s{note}; the simulator used "
              f"{sim_used:.1f} CPU-s over the sync, {share:.0%} of a core over the import stretch"
              + ("; the SIMULATOR (one event loop) is the bottleneck of that stretch" if share > 0.8 else
                 "; not CPU-bound: the stretch waits on job polls (HEAPSYNC_SINK_IMPORT_POLL_SECONDS)"),
              flush=True)


# ---------------------------------------------------------------- the runs


def warm_up(stack: Stack, timeout: float) -> float:
    """A one-page sync through the whole chain, so group joins and first connections are not measured."""
    t = time.time()
    plan = SyncPlan(str(uuid.uuid4()), "1", "initial", 3, stack.accounts[0])
    run_sync(stack, [plan], 1, timeout)
    return time.time() - t


def bench_sizes(kind: str, users: int, followup: bool, ceilings: bool, concurrency: int, timeout: float,
                import_step: float) -> list[dict[str, Any]]:
    from bench.brokers import idle_cpu_note, label, open_broker

    out = []
    with tempfile.TemporaryDirectory(prefix="heapsync-e2e-") as tmp, open_broker(kind, Path(tmp)) as broker:
        print(f"[e2e] broker: {label(kind)}; {idle_cpu_note(broker, 2.0)}; simulator import step {import_step} s; "
              f"{users:,} users, pages of {PAGE}", flush=True)
        stack = Stack(broker, Path(tmp), import_step=import_step)
        try:
            stack.start()
            print(f"  chain warm after {warm_up(stack, timeout):.1f} s (group joins, first connections)", flush=True)
            segment = "7"
            syncs = [SyncPlan(str(uuid.uuid4()), segment, "initial", users)]
            if followup:
                syncs.append(SyncPlan(str(uuid.uuid4()), segment, "followup", users))
            for plan in syncs:
                r = run_sync(stack, [plan], concurrency, timeout)
                exact = check_exact(stack, [plan])
                title = (f"initial sync of {users:,} users" if plan.kind == "initial" else
                         f"follow-up: {plan.changed:,} removed and {plan.changed:,} added")
                report(title, r, None, None, exact)
                if ceilings:
                    try:
                        ceiling = run_ceiling(broker.bootstrap, stack.settings.topics.pages, r["starts"], [plan],
                                              stack.env)
                    except Exception as exc:  # the sync's own figures are printed already
                        print(f"  ceiling not measured: {exc}", flush=True)
                        ceiling = None
                    report_ceilings(r, ceiling, simulator_import_cpu([plan], stack.settings.delta_chunk_size))
                out.append(r)
        except Exception:
            for name in stack.procs:
                lines = (Path(tmp) / f"{name}.log").read_text(errors="replace").strip().splitlines()
                errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
                for line in errors[-2:]:
                    print(f"  {name}: {line[:500]}", flush=True)
            raise
        finally:
            stack.stop()
            keep = os.environ.get("BENCH_E2E_KEEP_LOGS")  # a folder: the stages' logs are copied there
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("*.log"):
                    (Path(keep) / log.name).write_bytes(log.read_bytes())
    return out


def scale_out_keys(users: int, segments: int) -> list[tuple[str, str]]:
    """The scale-out runs' (account, segment) pairs, each segment in an account (and simulator) of its own; prints
    where their pages and lists land."""
    keys = spread_keys(segments, PARTITIONS, own_accounts=True)
    parts = sorted(page_partition(s, PARTITIONS, a) for a, s in keys)
    dparts = sorted(delta_partition(s, PARTITIONS, a) for a, s in keys)
    print(f"[e2e] scale-out: {segments} segments of {users // segments:,} users, each in its own account with its own "
          f"Cordial simulator process; pages topic partitions {parts}, deltas topic partitions {dparts} of "
          f"{PARTITIONS}. One segment is one partition (its pages are keyed by account:segment, in order), so one "
          "huge segment runs on one worker and its list on one sink replica whatever the replicas", flush=True)
    return keys


def bench_scale_out(kind: str, users: int, segments: int, concurrency: int, timeout: float,
                    import_step: float) -> float:
    """The same initial syncs of ``segments`` segments on 1 worker + 1 sink, then on 2 + 2: the speed-up."""
    from bench.brokers import label, open_broker

    keys = scale_out_keys(users, segments)
    seconds: dict[tuple[int, int], float] = {}
    for workers, sinks in ((1, 1), (2, 2)):
        with tempfile.TemporaryDirectory(prefix="heapsync-e2e-") as tmp, open_broker(kind, Path(tmp)) as broker:
            stack = Stack(broker, Path(tmp), workers=workers, sinks=sinks, import_step=import_step,
                          accounts=tuple(a for a, _ in keys))
            try:
                stack.start()
                warm_up(stack, timeout)
                plans = [SyncPlan(str(uuid.uuid4()), s, "initial", users // segments, a) for a, s in keys]
                r = run_sync(stack, plans, concurrency, timeout)
                report(f"{workers} worker(s) + {sinks} sink(s) on {label(kind)}", r, None, None,
                       check_exact(stack, plans))
                seconds[(workers, sinks)] = r["last_import"] - r["first"]
            finally:
                stack.stop()
    ratio = seconds[(1, 1)] / seconds[(2, 2)]
    print(f"[e2e] scale-out: 2 workers + 2 sinks are {ratio:.2f}x as fast as 1 + 1 ({seconds[(1, 1)]:.1f} s -> "
          f"{seconds[(2, 2)]:.1f} s; 2 shared cores)", flush=True)
    return ratio


def measure_stage(stack: Stack, stage: str, probes: list[str], deltas: list[str], ids: int,
                  timeout: float) -> dict[str, Any]:
    """Time a stage on a backlog already on its topic, from starting its processes (or, when they run already and
    are paused, resuming them) to every one of ``deltas`` done (``worker``: its last chunk on the deltas topic;
    ``sink``: its last import done). ``probes``: one-id syncs posted first on every partition; the first done
    marks the end of the start (interpreters, the group join), from which the work and its CPU are counted."""
    import signal

    from bench.brokers import cpu_seconds

    watcher = stack.deltas if stage == "worker" else stack.progress

    def done(delta_id: str) -> float:
        if stage == "worker":
            return stack.deltas.wait(delta_id, timeout)
        return stack.progress.wait(delta_id, timeout, stack.alive)

    load = os.getloadavg()[0]
    resume = any(n.rstrip("0123456789") == stage for n in stack.procs)
    cpu0 = {n: cpu_seconds(p) for n, p in stack.pids().items()}
    t0 = time.time()
    if resume:
        stack.signal(stage, signal.SIGCONT)
    else:
        (stack.start_workers if stage == "worker" else stack.start_sinks)()
    deadline = time.monotonic() + timeout
    while probes and not any(d in watcher.done_at for d in probes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {stage} came up in {timeout:.0f} s")
        time.sleep(0.02)
    now = {n: cpu_seconds(p) for n, p in stack.pids().items()}
    cpu0 = now if probes else {**now, **cpu0}  # from the first probe on, or from the resume
    up = min((watcher.done_at[d] for d in probes if d in watcher.done_at), default=t0)
    last = max(done(d) for d in [*probes, *deltas])
    cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in stack.pids().items()}
    return {"seconds": last - t0, "up": up - t0, "work": last - up, "cpu": cpu, "ids": ids, "resumed": resume,
            "load": (load, os.getloadavg()[0])}


def report_stage(title: str, r: dict[str, Any]) -> None:
    per_m = 1e6 / r["ids"]
    wall = max(r["work"], 1e-9)
    start = "resumed" if r["resumed"] else f"started; first probe done after {r['up']:.1f} s (interpreters, group join)"
    print(f"  {title}: {r['seconds']:.1f} s ({start}; then {r['work']:.1f} s of work); all processes used "
          f"{sum(r['cpu'].values()) / wall:.2f} cores of 2 over that work; load average "
          f"{r['load'][0]:.2f} before, {r['load'][1]:.2f} after", flush=True)
    for name in sorted(r["cpu"]):
        print(f"    {name:<11} CPU {r['cpu'][name] * per_m:6.1f} s per million ids "
              f"({r['cpu'][name] / wall:.0%} of a core)", flush=True)


def bench_stages(kind: str, users: int, segments: int, concurrency: int, timeout: float,
                 import_step: float) -> dict[str, float]:
    """The replay-after-outage case, one stage at a time, 1 then 2 of each: the workers, up and paused (SIGSTOP)
    while every page is posted, resume and assemble them (no sink runs); then the sinks start on every delta
    already on the deltas topic. Whether heapsync's own stages scale when they, not the poster, the ingress or
    the stand-in, are the bottleneck."""
    import signal

    from bench.brokers import label, open_broker
    from heapsync.contracts import delta_id_for

    keys = scale_out_keys(users, segments)
    found: dict[str, dict[int, dict[str, Any]]] = {"worker": {}, "sink": {}}
    for n in (1, 2):
        with tempfile.TemporaryDirectory(prefix="heapsync-e2e-") as tmp, open_broker(kind, Path(tmp)) as broker:
            stack = Stack(broker, Path(tmp), workers=n, sinks=n, import_step=import_step,
                          accounts=tuple(a for a, _ in keys))
            try:
                stack.start(stages=False)
                stack.start_workers()
                probes = [SyncPlan(str(uuid.uuid4()), s, "initial", 1, a) for a, s in keys]
                plans = [SyncPlan(str(uuid.uuid4()), s, "initial", users // segments, a) for a, s in keys]
                run_poster(stack.url, probes, concurrency, stack.env)  # first on each of the segments' partitions
                pids = [delta_id_for(p.account, p.sync_id) for p in probes]
                t0 = time.time()
                ready = max(stack.deltas.wait(d, timeout) for d in pids) - t0
                stack.signal("worker", signal.SIGSTOP)
                posted = run_poster(stack.url, plans, concurrency, stack.env)
                ids = sum(p.ids for p in plans)
                print(f"[e2e] stages, {n} of each on {label(kind)}: worker(s) up after {ready:.1f} s, then paused; "
                      f"{ids:,} ids posted in {posted['last'] - posted['first']:.1f} s; no sink running yet",
                      flush=True)
                dids = [delta_id_for(p.account, p.sync_id) for p in plans]
                found["worker"][n] = measure_stage(stack, "worker", [], dids, ids, timeout)
                report_stage(f"{n} worker(s), pages already on the topic -> last delta chunk", found["worker"][n])
                found["sink"][n] = measure_stage(stack, "sink", pids, dids, ids, timeout)
                report_stage(f"{n} sink(s), deltas already on the topic -> last import done", found["sink"][n])
                print(f"  {check_exact(stack, plans)}", flush=True)
            finally:
                stack.stop()
    ratios = {}
    for stage, by_n in found.items():
        one, two = by_n[1], by_n[2]
        ratios[stage] = one["work"] / max(two["work"], 1e-9)
        print(f"[e2e] stages: 2 {stage}s are {ratios[stage]:.2f}x as fast as 1 at the work ({one['work']:.1f} s -> "
              f"{two['work']:.1f} s), {one['seconds'] / two['seconds']:.2f}x counting their start "
              f"({one['seconds']:.1f} s -> {two['seconds']:.1f} s); 2 shared cores", flush=True)
    return ratios


def parse_args(argv: list[str]) -> argparse.Namespace:
    from bench.brokers import add_broker_argument

    parser = argparse.ArgumentParser(prog="python -m bench e2e",
                                     description="The whole chain as processes: signed pages -> ingress -> worker -> "
                                                 "sink -> Cordial simulator (contact imports), measured per sync.")
    sub = parser.add_subparsers(dest="cmd", help=argparse.SUPPRESS)  # post/ceiling: the benchmark's own children
    p_post = sub.add_parser("post")
    p_post.add_argument("--url", required=True)
    p_post.add_argument("--plans", required=True)
    p_post.add_argument("--concurrency", type=int, default=8)
    p_ceiling = sub.add_parser("ceiling")
    p_ceiling.add_argument("--bootstrap", required=True)
    p_ceiling.add_argument("--topic", required=True)
    p_ceiling.add_argument("--spec", required=True)
    parser.add_argument("--users", type=int, default=int(os.environ.get(USERS_ENV, "1000000")),
                        help=f"users in the initial sync (default ${USERS_ENV}, else 1,000,000); the follow-up "
                             f"removes {CHURN:.0%} and adds as many")
    parser.add_argument("--no-followup", action="store_true", help="only the initial sync")
    parser.add_argument("--quick", action="store_true", help="no ceilings (a smoke run)")
    parser.add_argument("--scale-out", action="store_true",
                        help="instead: many large segments on 1 worker + 1 sink, then on 2 + 2, and the ratio")
    parser.add_argument("--stages", action="store_true",
                        help="with --scale-out: each stage alone on a backlog already on its topic (pages before any "
                             "worker starts, deltas before any sink starts), 1 vs 2 of each")
    parser.add_argument("--segments", type=int, default=6, help="segments of the scale-out run (default 6)")
    parser.add_argument("--concurrency", type=int, default=8, help="pages posted at once (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a sync may take (default 1800)")
    parser.add_argument("--import-step", type=float, default=0.0,
                        help="seconds the simulator's import job spends in each state (default 0: the bench measures "
                             "heapsync, not the stand-in's made-up delays)")
    add_broker_argument(parser)
    args = parser.parse_args(argv)
    if args.users < 1 or args.segments < 1 or args.concurrency < 1:
        parser.error("--users, --segments and --concurrency must be at least 1")
    if args.stages and not args.scale_out:
        parser.error("--stages goes with --scale-out")
    return args


def main(argv: list[str] | None = None) -> None:
    from bench.brokers import brokers_from_args, run_each

    args = parse_args(list(argv or []))
    if args.cmd == "post":
        plans = [SyncPlan(**p) for p in json.loads(args.plans)]
        print(json.dumps(asyncio.run(post_all(args.url, plans, args.concurrency))))
        return
    if args.cmd == "ceiling":
        spec = json.loads(args.spec)
        ceiling_main(args.bootstrap, args.topic, {int(p): o for p, o in spec["starts"].items()}, set(spec["syncs"]),
                     spec["pages"])
        return
    kinds = brokers_from_args(args.broker)
    if args.scale_out and args.stages:
        run_each("e2e", kinds, lambda kind: bench_stages(kind, args.users, args.segments, args.concurrency,
                                                        args.timeout, args.import_step))
    elif args.scale_out:
        run_each("e2e", kinds, lambda kind: bench_scale_out(kind, args.users, args.segments, args.concurrency,
                                                           args.timeout, args.import_step))
    else:
        run_each("e2e", kinds, lambda kind: bench_sizes(kind, args.users, not args.no_followup, not args.quick,
                                                       args.concurrency, args.timeout, args.import_step))


if __name__ == "__main__":
    main(sys.argv[1:])
