"""Ingest benchmark: signed Heap pages through the real ingress into the embedded broker, against a
bare aiohttp handler that only reads the body and answers 200 (the framework ceiling), in the same run.

    python -m bench ingest                   # or: make bench (Tansu and Apache Kafka)
    python -m bench ingest --broker kafka    # one broker: tansu, kafka or both
    python -m bench ingest --quick           # a shorter run

Three processes besides the broker: the ingress (``heapsync ingest``, as deployed), the bare handler,
and a load generator (aiohttp client) posting pre-signed pages over loopback with a fixed number of
connections. Each run is bounded in requests and in seconds. Reports pages/s, ids/s, p50/p99 latency,
peak RSS (VmHWM) of the ingress process, and the ratio to the ceiling.
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

SECRET = "bench-secret"
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


def make_requests(ids_per_page: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` distinct signed pages (distinct sync tasks and ids), signed now."""
    import orjson

    from heapsync.samples import heap_request
    from ingest.signature import heap_hash_header

    out = []
    ts = int(time.time() * 1000)
    distinct = min(count, 500)
    for n in range(distinct):
        task = f"bench-{n}"
        body = orjson.dumps(heap_request(task, 1, 1, add=[f"user{n}-{i}@example.com" for i in range(ids_per_page)],
                                         remove=[], segment_id=str(n % 64)))
        out.append((body, {"Content-Type": "application/json",
                           "Heap-Hash": heap_hash_header(SECRET.encode(), ts, body)}))
    return [out[i % distinct] for i in range(count)]


async def load(url: str, ids_per_page: int, count: int, duration: float, concurrency: int) -> dict[str, Any]:
    import aiohttp

    requests = make_requests(ids_per_page, count)
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


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_load(url: str, case: Case) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "load", "--url", url, "--ids", str(case.ids_per_page),
         "--count", str(case.count), "--duration", str(case.duration), "--concurrency", str(case.concurrency)],
        capture_output=True, text=True, timeout=case.duration + 120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    from heapsync.broker import die_with_parent

    return subprocess.Popen([sys.executable, *args], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen[bytes]) -> int:
    from heapsync.broker import stop_process

    return stop_process(proc, 30)


def fmt(r: dict[str, Any]) -> str:
    cpu = (f", server CPU {r['server_cpu_s'] / r['seconds']:.0%} ({r['server_cpu_s'] / r['requests'] * 1e6:.0f} µs/page), "
           f"load generator CPU {r['load_cpu_s'] / r['seconds']:.0%}")
    if "broker_cpu_s" in r:
        cpu += f", broker CPU {r['broker_cpu_s'] / r['seconds']:.0%} ({r['broker_cpu_s'] / r['requests'] * 1e6:.0f} µs/page)"
    return (f"{r['pages_per_s']:8.0f} pages/s {r['ids_per_s']:10.0f} ids/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  ({r['requests']} requests in {r['seconds']:.1f} s{cpu}; "
            f"statuses {r['statuses']})")


def bench(quick: bool = False, kinds: tuple[str, ...] = ("tansu",), rounds: int | None = None) -> list[dict[str, Any]]:
    """Every case on each broker in ``kinds`` (a fresh broker each), ceiling and ingress interleaved."""
    from bench.brokers import run_each

    results: list[dict[str, Any]] = []
    run_each("ingest", list(kinds), lambda kind: results.extend(bench_on(kind, quick, rounds)))
    return results


def bench_on(kind: str, quick: bool, rounds: int | None) -> list[dict[str, Any]]:
    from bench.brokers import broker_pid, cpu_seconds, idle_cpu_note, label, load_average, open_broker
    from heapsync.broker import free_port, wait_for_port
    from heapsync.kafka import ensure_topics
    from heapsync.settings import Settings

    scale = 0.3 if quick else 1.0
    rounds = rounds or (1 if quick else 3)
    cases = [Case(10, int(30_000 * scale), 15 * scale, 64), Case(1000, int(6_000 * scale), 15 * scale, 32)]
    results = []
    with tempfile.TemporaryDirectory(prefix="heapsync-bench-") as tmp, open_broker(kind, Path(tmp)) as broker:
        print(f"[ingest] broker: {label(kind)}; {idle_cpu_note(broker)}", flush=True)
        workdir = Path(tmp)
        broker_process = broker_pid(broker)
        accounts = workdir / "accounts.toml"
        accounts.write_text(f'[accounts.{ACCOUNT}]\nheap_webhook_secrets = ["{SECRET}"]\ncordial_api_key = "x"\n')
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": broker.bootstrap, "HEAPSYNC_TOPIC_PREFIX": prefix,
               "HEAPSYNC_ACCOUNTS_FILE": str(accounts), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        ensure_topics(Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix))
        for case in cases:
            bare_port, ingest_port = free_port(), free_port()
            bare = start(["-m", "bench.ingest", "bare", "--port", str(bare_port)], env, workdir / "bare.log")
            profile = os.environ.get("BENCH_INGEST_PROFILE")  # a path: run the ingress under cProfile
            prefix_args = ["-m", "cProfile", "-o", f"{profile}.{case.ids_per_page}"] if profile else []
            ingress = start([*prefix_args, "-m", "heapsync.cli", "ingest", "--port", str(ingest_port)], env,
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
    parser.add_argument("--quick", action="store_true", help="0.3 of the requests and seconds, one round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 3, quick 1)")
    add_broker_argument(parser)
    args = parser.parse_args(argv if argv is not None else [])
    if args.cmd == "bare":
        serve_bare(args.port)
    elif args.cmd == "load":
        result = asyncio.run(load(args.url, args.ids, args.count, args.duration, args.concurrency))
        print(json.dumps(result))
    else:
        bench(quick=args.quick, kinds=tuple(brokers_from_args(args.broker)), rounds=args.rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
