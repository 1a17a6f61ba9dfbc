"""Run every benchmark (or the ones named): ``python -m bench [--broker tansu|kafka|both] [ingest] [assembler] ...``.

Names pick benchmarks; every other argument goes to each named benchmark's own parser, so
``python -m bench ingest --help`` prints the ingest benchmark's options and ``python -m bench
--broker kafka`` runs every broker-bound benchmark on Apache Kafka only.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["ingest", "assembler", "sink", "archive", "replay", "e2e"]
BROKER_BOUND = {"ingest", "assembler", "sink", "e2e"}
"""The benchmarks that take ``--broker`` and run on Tansu and on Apache Kafka; replay runs on Tansu, archive on disk."""

USAGE = f"""usage: python -m bench [--broker tansu|kafka|both] [BENCHMARK ...] [OPTIONS]

benchmarks: {', '.join(BENCHMARKS)} (default: all). Options go to each named benchmark;
--broker applies to {', '.join(sorted(BROKER_BOUND))} (default: $HEAPSYNC_BENCH_BROKERS, else both
when java and mvn are on PATH, else tansu). One benchmark's options: python -m bench NAME --help
"""


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(benchmark names, the arguments for them): a word is a name only if it names a benchmark."""
    names = [a for a in argv if a in BENCHMARKS]
    rest = [a for a in argv if a not in BENCHMARKS]
    return names, rest


def without_broker(args: list[str]) -> list[str]:
    """``args`` minus ``--broker X`` / ``--broker=X``, for the benchmarks that do not take it."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--broker":
            skip = True
        elif not a.startswith("--broker="):
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    names, rest = split_args(argv)
    if not names and any(a in ("-h", "--help") for a in rest):
        print(USAGE, end="")
        return 0
    unknown = [a for a in rest if not a.startswith("-") and a not in ("tansu", "kafka", "both")]
    if unknown and not names:
        print(f"unknown benchmark {unknown[0]!r}\n{USAGE}", end="", file=sys.stderr)
        return 2
    names = names or BENCHMARKS
    if len(names) > 1 and without_broker(rest):
        print(f"options other than --broker need one benchmark name (python -m bench NAME {' '.join(rest)})\n{USAGE}",
              end="", file=sys.stderr)
        return 2
    from bench.brokers import BenchFailed

    failed = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"[bench] {name}", flush=True)
        try:
            module.main(rest if name in BROKER_BOUND else without_broker(rest))
        except BenchFailed as exc:  # already printed where it failed; the other benchmarks still run
            failed.append(str(exc))
    for line in failed:
        print(f"[bench] {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
