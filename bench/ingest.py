"""Ingest benchmark: signed Heap pages through the real ingress into the embedded broker, against a
bare aiohttp handler that only reads the body and answers 200 (the framework ceiling), in the same run.

    python -m bench ingest                           # or: make bench (Tansu and Apache Kafka)
    python -m bench ingest --broker kafka            # one broker: tansu, kafka or both
    python -m bench ingest --quick                   # a shorter run
    python -m bench ingest --quick --only refused    # only what refusals cost (they never reach the broker)

Three processes besides the broker: the ingress (``heapsync ingest``, as deployed), the bare handler,
and a load generator (aiohttp client) posting pre-signed pages over loopback with a fixed number of
connections. Each run is bounded in requests and in seconds. Reports pages/s, ids/s, p50/p99 latency,
peak RSS (VmHWM) of the ingress process, and the ratio to the ceiling.

Refused requests (issue 16: what an attacker without the secret costs): the same load generator posts
requests the ingress must refuse (unknown account, missing or malformed Heap-Hash, a wrong signature,
and a ~15 KB gzip body inflating to 15 MiB without and with a well-formed wrong signature) and reports
refused requests per second, the ingress's CPU per refused request, and the ratio to the bare handler
reading and answering the 10-id page in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECRET = "bench-webhook-secret"
ACCOUNT = "bench"


# ---------------------------------------------------------------- the bare handler (the ceiling)


def serve_bare(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "accepted"})

    from ingest.server import event_loop

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/heap/listMembership/{account_id}", handle)
    # the same event loop as the ingress, so that the ratio compares like with like
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=event_loop())


# ---------------------------------------------------------------- the load generator


REFUSED = {
    # kind: (what it is, the status the ingress answers)
    "unknown-account": ("unknown account (404)", 404),
    "missing-hash": ("missing Heap-Hash (403)", 403),
    "malformed-hash": ("malformed Heap-Hash (403)", 403),
    "wrong-signature": ("wrong signature (403)", 403),
    "bomb-unsigned": ("15 KB gzip -> 15 MiB, no Heap-Hash (403)", 403),
    "bomb-wrong-signature": ("15 KB gzip -> 15 MiB, wrong signature (403)", 403),
}
BOMB_DECODED = 15 * 1024 * 1024
"""Under the default 16 MiB limit: the ingress inflates and hashes it all before the signature says no."""


def make_requests(ids_per_page: int, count: int, kind: str = "accepted") -> list[tuple[bytes, dict[str, str]]]:
    """``count`` distinct pages (distinct sync tasks and ids), signed now; for a refused ``kind``, spoilt
    the way that kind is (the unknown account is in the URL the orchestrator passes)."""
    import gzip

    import orjson

    from heapsync_dev.samples import heap_request
    from ingest.signature import heap_hash_header

    ts = int(time.time() * 1000)
    if kind.startswith("bomb-"):
        body = gzip.compress(b"[" + b" " * (BOMB_DECODED - 2) + b"]", compresslevel=9)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if kind == "bomb-wrong-signature":
            headers["Heap-Hash"] = heap_hash_header(b"not-the-secret", ts, body)
        return [(body, headers)] * count
    out = []
    distinct = min(count, 500)
    for n in range(distinct):
        task = f"bench-{n}"
        body = orjson.dumps(heap_request(task, 1, 1, add=[f"user{n}-{i}@example.com" for i in range(ids_per_page)],
                                         remove=[], segment_id=str(n % 64)))
        secret = b"not-the-secret" if kind == "wrong-signature" else SECRET.encode()
        headers = {"Content-Type": "application/json", "Heap-Hash": heap_hash_header(secret, ts, body)}
        if kind == "missing-hash":
            del headers["Heap-Hash"]
        elif kind == "malformed-hash":
            headers["Heap-Hash"] = f"ts:{ts}"
        out.append((body, headers))
    return [out[i % distinct] for i in range(count)]


async def load(url: str, ids_per_page: int, count: int, duration: float, concurrency: int,
               kind: str = "accepted") -> dict[str, Any]:
    import aiohttp

    requests = make_requests(ids_per_page, count, kind)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0
    deadline = 0.0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < len(requests) and time.perf_counter() < deadline:
            body, headers = requests[next_index]
            next_index += 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # warm up: connections, producer metadata
        warm = requests[: min(200, len(requests))]
        for body, headers in warm[:concurrency]:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
        deadline = time.perf_counter() + duration
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed, load_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    latencies.sort()
    done = len(latencies)
    return {
        "requests": done, "seconds": elapsed, "statuses": statuses, "load_cpu_s": load_cpu,
        "pages_per_s": done / elapsed, "ids_per_s": done * ids_per_page / elapsed,
        "p50_ms": latencies[done // 2] * 1000 if done else None,
        "p99_ms": latencies[min(done - 1, int(done * 0.99))] * 1000 if done else None,
    }


# ---------------------------------------------------------------- orchestration


@dataclass
class Case:
    ids_per_page: int
    count: int
    duration: float
    concurrency: int
    kind: str = "accepted"


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(url: str, case: Case) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "load", "--url", url, "--ids", str(case.ids_per_page),
         "--count", str(case.count), "--duration", str(case.duration), "--concurrency", str(case.concurrency),
         "--kind", case.kind],
        capture_output=True, text=True, timeout=case.duration + 120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    from heapsync_dev.processes import die_with_parent

    return subprocess.Popen([sys.executable, *args], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen[bytes]) -> int:
    from heapsync_dev.processes import stop_process

    return stop_process(proc, 30)


def fmt(r: dict[str, Any]) -> str:
    cpu = (f", server CPU {r['server_cpu_s'] / r['seconds']:.0%} ({r['server_cpu_s'] / r['requests'] * 1e6:.0f} µs/page), "
           f"load generator CPU {r['load_cpu_s'] / r['seconds']:.0%}")
    if "broker_cpu_s" in r:
        cpu += f", broker CPU {r['broker_cpu_s'] / r['seconds']:.0%} ({r['broker_cpu_s'] / r['requests'] * 1e6:.0f} µs/page)"
    return (f"{r['pages_per_s']:8.0f} pages/s {r['ids_per_s']:10.0f} ids/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  ({r['requests']} requests in {r['seconds']:.1f} s{cpu}; "
            f"statuses {r['statuses']})")


def fmt_refused(r: dict[str, Any], ceiling: dict[str, Any]) -> str:
    return (f"{r['pages_per_s']:8.0f} refused/s  ratio {r['pages_per_s'] / ceiling['pages_per_s']:4.0%}  "
            f"server CPU {r['server_cpu_s'] / r['requests'] * 1e6:6.0f} µs/request "
            f"({r['server_cpu_s'] / r['seconds']:.0%})  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
            f"({r['requests']} in {r['seconds']:.1f} s; statuses {r['statuses']})")


def bench_refused(quick: bool, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Refused requests per second and CPU per refusal, interleaved with the bare handler's 10-id pages."""
    from heapsync_dev.processes import free_port, wait_for_port

    scale = 0.3 if quick else 1.0
    rounds = 1 if quick else 3
    ceiling_case = Case(10, int(30_000 * scale), 10 * scale, 64)
    cases = [Case(10, int(30_000 * scale), 10 * scale, 64, kind) for kind in REFUSED if not kind.startswith("bomb-")]
    cases.append(Case(10, int(30_000 * scale), 10 * scale, 64, "bomb-unsigned"))
    cases.append(Case(10, int(400 * scale), 10 * scale, 8, "bomb-wrong-signature"))  # each one is inflated and hashed
    bare_port, ingest_port = free_port(), free_port()
    bare = start(["-m", "bench.ingest", "bare", "--port", str(bare_port)], env, workdir / "bare-refused.log")
    ingress = start(["-m", "heapsync_ops.cli", "ingest", "--port", str(ingest_port)], env, workdir / "ingest-refused.log")
    path = f"/heap/listMembership/{ACCOUNT}"
    ceilings: list[dict[str, Any]] = []
    measured: dict[str, list[dict[str, Any]]] = {c.kind: [] for c in cases}
    rss_before_signed_bomb: float | None = None
    try:
        wait_for_port("127.0.0.1", bare_port)
        wait_for_port("127.0.0.1", ingest_port)
        for _ in range(rounds):
            cpu0 = cpu_seconds(bare.pid)
            ceiling = run_load(f"http://127.0.0.1:{bare_port}{path}", ceiling_case)
            ceiling["server_cpu_s"] = cpu_seconds(bare.pid) - cpu0
            ceilings.append(ceiling)
            for case in cases:
                if case.kind == "bomb-wrong-signature" and rss_before_signed_bomb is None:
                    rss_before_signed_bomb = peak_rss_mb(ingress.pid)
                account_path = "/heap/listMembership/nobody" if case.kind == "unknown-account" else path
                cpu0 = cpu_seconds(ingress.pid)
                result = run_load(f"http://127.0.0.1:{ingest_port}{account_path}", case)
                result["server_cpu_s"] = cpu_seconds(ingress.pid) - cpu0
                measured[case.kind].append(result)
        rss = peak_rss_mb(ingress.pid)
    finally:
        stop(bare)
        code = stop(ingress)
    best_ceiling = max(ceilings, key=lambda r: r["pages_per_s"])
    print(f"[ingest] refused requests, best of {rounds} interleaved rounds (10-id page bodies, 64 connections; "
          f"the signed bomb 8)")
    per_round = ", ".join(f"{r['pages_per_s']:.0f}" for r in ceilings)
    print(f"  bare handler, 10-id page read and answered 200: {best_ceiling['pages_per_s']:.0f} requests/s, "
          f"server CPU {best_ceiling['server_cpu_s'] / best_ceiling['requests'] * 1e6:.0f} µs/request "
          f"(per round: {per_round})")
    best: dict[str, dict[str, Any]] = {}
    for kind, results in measured.items():
        best[kind] = max(results, key=lambda r: r["pages_per_s"])
        expected = REFUSED[kind][1]
        wrong = {s: n for s, n in best[kind]["statuses"].items() if int(s) != expected}
        note = f"  UNEXPECTED statuses {wrong}" if wrong else ""
        print(f"  {REFUSED[kind][0]:<44}: {fmt_refused(best[kind], best_ceiling)}{note}")
    print(f"  ingress peak RSS {rss_before_signed_bomb:.0f} MB before the signed bombs, {rss:.0f} MB after; "
          f"exit code {code}")
    return {"ceiling": best_ceiling, "refused": best, "peak_rss_mb": rss,
            "peak_rss_mb_before_signed_bomb": rss_before_signed_bomb}


def bench(quick: bool = False, only: str | None = None, kinds: tuple[str, ...] = ("tansu",),
          rounds: int | None = None) -> list[dict[str, Any]]:
    """Every case on each broker in ``kinds`` (a fresh broker each), ceiling and ingress interleaved; the
    refused requests once, on the first broker (the ingress refuses them before anything is produced)."""
    from bench.brokers import run_each

    results: list[dict[str, Any]] = []
    run_each("ingest", list(kinds),
             lambda kind: results.extend(bench_on(kind, quick, only, rounds, refused=kind == kinds[0])))
    return results


def bench_on(kind: str, quick: bool, only: str | None, rounds: int | None, refused: bool) -> list[dict[str, Any]]:
    from bench.brokers import broker_pid, idle_cpu_note, label, load_average, open_broker
    from heapsync.kafka import ensure_topics
    from heapsync.settings import Settings
    from heapsync_dev.processes import free_port, wait_for_port

    scale = 0.3 if quick else 1.0
    rounds = rounds or (1 if quick else 3)
    cases = [Case(10, int(30_000 * scale), 15 * scale, 64), Case(1000, int(6_000 * scale), 15 * scale, 32)]
    if only == "refused":
        cases = []
    results = []
    with tempfile.TemporaryDirectory(prefix="heapsync-bench-") as tmp, open_broker(kind, Path(tmp)) as broker:
        print(f"[ingest] broker: {label(kind)}; {idle_cpu_note(broker)}", flush=True)
        workdir = Path(tmp)
        broker_process = broker_pid(broker)
        accounts = workdir / "accounts.toml"
        accounts.write_text(f'[accounts.{ACCOUNT}]\nheap_webhook_secrets = ["{SECRET}"]\ncordial_api_key = "x"\n')
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": broker.bootstrap, "HEAPSYNC_TOPIC_PREFIX": prefix,
               "HEAPSYNC_ACCOUNTS_FILE": str(accounts), "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               # each ingress on its own admin port, off the default a `make run` may hold
               "HEAPSYNC_ADMIN_PORT": str(free_port())}
        ensure_topics(Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix))
        for case in cases:
            bare_port, ingest_port = free_port(), free_port()
            bare = start(["-m", "bench.ingest", "bare", "--port", str(bare_port)], env, workdir / "bare.log")
            profile = os.environ.get("BENCH_INGEST_PROFILE")  # a path: run the ingress under cProfile
            prefix_args = ["-m", "cProfile", "-o", f"{profile}.{case.ids_per_page}"] if profile else []
            ingress = start([*prefix_args, "-m", "heapsync_ops.cli", "ingest", "--port", str(ingest_port)], env,
                            workdir / "ingest.log")
            try:
                wait_for_port("127.0.0.1", bare_port)
                wait_for_port("127.0.0.1", ingest_port)
                path = f"/heap/listMembership/{ACCOUNT}"
                ceilings, measurements, loads = [], [], []
                for _ in range(rounds):  # interleaved, best of each: the machine is shared
                    cpu0 = cpu_seconds(bare.pid)
                    ceiling = run_load(f"http://127.0.0.1:{bare_port}{path}", case)
                    ceiling["server_cpu_s"] = cpu_seconds(bare.pid) - cpu0
                    ceilings.append(ceiling)
                    cpu0, bcpu0 = cpu_seconds(ingress.pid), cpu_seconds(broker_process)
                    measured = run_load(f"http://127.0.0.1:{ingest_port}{path}", case)
                    measured["server_cpu_s"] = cpu_seconds(ingress.pid) - cpu0
                    measured["broker_cpu_s"] = cpu_seconds(broker_process) - bcpu0
                    measurements.append(measured)
                    loads.append(load_average())
                ceiling = max(ceilings, key=lambda r: r["pages_per_s"])
                measured = max(measurements, key=lambda r: r["pages_per_s"])
                rss = peak_rss_mb(ingress.pid)
            finally:
                stop(bare)
                code = stop(ingress)
            ratio = measured["pages_per_s"] / ceiling["pages_per_s"]
            per_round = "bare " + ", ".join(f"{r['pages_per_s']:.0f}" for r in ceilings)
            per_round += "; ingress " + ", ".join(f"{r['pages_per_s']:.0f}" for r in measurements)
            # per round: a JVM broker gets cheaper per page as it warms up (JIT), so the first rounds cost more
            per_round += "; broker µs/page " + ", ".join(f"{r['broker_cpu_s'] / r['requests'] * 1e6:.0f}"
                                                          for r in measurements)
            print(f"[ingest] {kind}: {case.ids_per_page:>5}-id pages, {case.concurrency} connections, best of "
                  f"{rounds} interleaved rounds (pages/s per round: {per_round}; load average {', '.join(loads)})")
            print(f"  bare handler : {fmt(ceiling)}")
            print(f"  ingress      : {fmt(measured)}")
            print(f"  ratio {ratio:.0%} of the bare handler's pages/s; ingress peak RSS {rss:.0f} MB; "
                  f"exit code {code}")
            results.append({"broker": kind, "ids_per_page": case.ids_per_page, "ceiling": ceiling, "ingress": measured,
                            "ratio": ratio, "ingress_peak_rss_mb": rss})
        if only != "accepted" and refused:
            results.append(bench_refused(quick, env, workdir))
    return results


def main(argv: list[str] | None = None) -> None:
    from bench.brokers import add_broker_argument, brokers_from_args

    parser = argparse.ArgumentParser(prog="python -m bench ingest",
                                     description="Signed Heap pages through the ingress against a bare aiohttp "
                                                 "handler, on each broker.")
    sub = parser.add_subparsers(dest="cmd", help=argparse.SUPPRESS)  # bare/load: the benchmark's own children
    p_bare = sub.add_parser("bare")
    p_bare.add_argument("--port", type=int, required=True)
    p_load = sub.add_parser("load")
    p_load.add_argument("--url", required=True)
    p_load.add_argument("--ids", type=int, required=True)
    p_load.add_argument("--count", type=int, required=True)
    p_load.add_argument("--duration", type=float, required=True)
    p_load.add_argument("--concurrency", type=int, required=True)
    p_load.add_argument("--kind", default="accepted", choices=["accepted", *REFUSED])
    parser.add_argument("--quick", action="store_true", help="shorter rounds, one of each")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per accepted-page case (default 3, quick 1)")
    parser.add_argument("--only", choices=["accepted", "refused"],
                        help="only accepted pages, or only refused requests (default: both; refused requests run "
                             "on the first broker only)")
    add_broker_argument(parser)
    args = parser.parse_args(argv if argv is not None else [])
    if args.cmd == "bare":
        serve_bare(args.port)
    elif args.cmd == "load":
        result = asyncio.run(load(args.url, args.ids, args.count, args.duration, args.concurrency, args.kind))
        print(json.dumps(result))
    else:
        bench(quick=args.quick, only=args.only, kinds=tuple(brokers_from_args(args.broker)), rounds=args.rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
