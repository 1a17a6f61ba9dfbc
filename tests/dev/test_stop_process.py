"""``stop_process``: what every launcher (dev, tests, benchmarks, the embedded broker) uses to stop a child."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from heapsync_dev.processes import stop_process, stop_processes

IGNORES_SIGTERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('ready', flush=True); time.sleep(60)")
EXITS_ON_SIGTERM = "import sys, time; print('ready', flush=True); time.sleep(60)"


def _start(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_child_that_honours_sigterm_stops_at_once() -> None:
    proc = _start(EXITS_ON_SIGTERM)
    started = time.monotonic()
    assert stop_process(proc, timeout=10) == -signal.SIGTERM
    assert time.monotonic() - started < 5


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    proc = _start(IGNORES_SIGTERM)
    started = time.monotonic()
    assert stop_process(proc, timeout=0.5) == -signal.SIGKILL
    assert 0.4 < time.monotonic() - started < 5


def test_stopping_several_shares_one_deadline_and_leaves_none_running() -> None:
    procs = [_start(IGNORES_SIGTERM), _start(EXITS_ON_SIGTERM), _start(IGNORES_SIGTERM)]
    started = time.monotonic()
    stop_processes(procs, timeout=0.5)
    assert time.monotonic() - started < 3  # not 0.5 s per process
    assert [p.returncode for p in procs] == [-signal.SIGKILL, -signal.SIGTERM, -signal.SIGKILL]


def test_an_exited_child_is_left_alone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert stop_process(proc) == 0
