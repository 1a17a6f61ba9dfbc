"""Which broker a benchmark runs on: Tansu (embedded, in memory) or a single-node Apache Kafka.

Every broker-bound benchmark takes ``--broker tansu|kafka|both`` (default: ``$HEAPSYNC_BENCH_BROKERS``,
else both when ``java`` and ``mvn`` are on PATH, else Tansu with one printed line saying why), and runs
itself, ceiling included, once per broker, so a figure and its ceiling always come from the same broker.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BROKER_KINDS = ("tansu", "kafka")
BROKERS_ENV = "HEAPSYNC_BENCH_BROKERS"


def add_broker_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", choices=[*BROKER_KINDS, "both"], default=None,
                        help=f"broker(s) to run on (default: ${BROKERS_ENV}, else both when java and mvn are on "
                             "PATH, else tansu)")


def selected_brokers(choice: str | None, missing: list[str]) -> tuple[list[str], str | None]:
    """The brokers to run on, and the line to print when Kafka is left out by default.

    ``missing`` is what :func:`heapsync_dev.apache_kafka.missing_tools` returns; an explicit choice
    wins (asking for Kafka without Java then fails at start, with the launcher's message).
    """
    choice = (choice or "").strip()
    if choice:
        if choice not in (*BROKER_KINDS, "both"):
            raise ValueError(f"broker {choice!r}: choose tansu, kafka or both")
        return (list(BROKER_KINDS) if choice == "both" else [choice]), None
    if missing:
        return ["tansu"], (f"[bench] Apache Kafka runs skipped: {' and '.join(missing)} not on PATH "
                           "(install Java 17 and Maven, or pass --broker tansu to silence this)")
    return list(BROKER_KINDS), None


def brokers_from_args(choice: str | None) -> list[str]:
    """Resolve ``--broker`` (or the environment) and print the skip line if there is one."""
    from heapsync_dev.apache_kafka import missing_tools

    kinds, note = selected_brokers(choice or os.environ.get(BROKERS_ENV), missing_tools())
    if note:
        print(note, flush=True)
    return kinds


def label(kind: str) -> str:
    from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION

    return "Tansu (memory storage)" if kind == "tansu" else f"Apache Kafka {DEFAULT_KAFKA_VERSION} (1 KRaft node)"


@contextmanager
def open_broker(kind: str, workdir: Path) -> Iterator[Any]:
    """A started broker of ``kind`` (``.bootstrap``), its log in ``workdir``; stopped on exit."""
    if kind == "tansu":
        from heapsync_dev.broker import EmbeddedBroker

        with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
            yield broker
        return
    from heapsync_dev.apache_kafka import KafkaCluster

    with KafkaCluster(nodes=1, log_dir=workdir) as cluster:
        yield cluster


def broker_pid(broker: Any) -> int:
    """The broker's process id, for its CPU time (the one node of a single-node Kafka)."""
    pid = broker.members[0].pid if getattr(broker, "kind", "") == "kafka" else broker.process.pid
    assert pid is not None, "broker is not running"
    return int(pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads, the JVM's included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The 1-minute load average now, to print beside each result (the machine is shared)."""
    return f"{os.getloadavg()[0]:.2f}"


class BenchFailed(RuntimeError):
    """A benchmark did not finish on one or more brokers (each failure was printed where it happened)."""


def run_each(name: str, kinds: list[str], run: Callable[[str], object]) -> None:
    """``run(kind)`` for every broker; one broker failing does not stop the others, but fails the whole run."""
    failed = []
    for kind in kinds:
        try:
            run(kind)
        except Exception as exc:  # reported here, raised below once every broker had its turn
            failed.append(kind)
            print(f"[{name}] FAILED on {label(kind)}: {type(exc).__name__}: {exc}", flush=True)
    if failed:
        raise BenchFailed(f"{name} failed on {', '.join(failed)}")


def idle_cpu_note(broker: Any, seconds: float = 5.0) -> str:
    """The broker's CPU with no client traffic of ours, so the per-unit figures can be read against it.

    A JVM broker burns some CPU of its own (KRaft, coordinators, GC, JIT right after start); over a
    long, slow phase that background shows up as "broker CPU per unit" and is not caused by the work.
    """
    import time

    pid = broker_pid(broker)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return f"broker CPU while idle: {(cpu_seconds(pid) - before) / seconds:.1%} of a core over {seconds:.0f} s"
