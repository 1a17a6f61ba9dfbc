"""Child processes of the dev tooling, tests and benchmarks: free loopback ports, waiting for a port,
stopping what was started (and only that), children that die with their parent, and Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any


class StopOnSignal:
    """Set once SIGINT or SIGTERM arrives: a foreground command polls it and then stops what it started."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.requested = True

    def __bool__(self) -> bool:
        return self.requested


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Signal every process still running, wait for them all up to ``timeout`` in total, kill what is left.

    Signalling all first lets them shut down side by side; the kill is the last resort, so
    a hung child never outlives whoever started it.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """``stop_processes`` for one process; returns its exit code."""
    stop_processes([proc], timeout, sig)
    return proc.returncode


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM if the process that started it dies (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
