"""`heapsync dev` as a user runs it: start, send the sample, see the list, Ctrl-C, nothing left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION
from heapsync_dev.broker import dev_broker_port
from heapsync_dev.processes import free_port
from tests.conftest import http

pytestmark = pytest.mark.integration


def processes_in(directory: Path) -> list[int]:
    """Pids whose working directory is ``directory``: what `heapsync dev` started there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_dev_broker_takes_the_configured_port_when_it_is_free() -> None:
    port = free_port()
    assert dev_broker_port(f"127.0.0.1:{port}") == port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        other = dev_broker_port(f"127.0.0.1:{busy}")
    assert other != busy
    assert dev_broker_port("not a bootstrap") > 0


def test_dev_runs_the_pipeline_and_stops_everything(tmp_path: Path, broker_kind: str) -> None:
    port, sim_port, admin_port = free_port(), free_port(), free_port()
    bootstrap = f"127.0.0.1:{free_port()}"
    # the broker goes where the settings point, so operator commands in another shell find it
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEAPSYNC_")},
           "HEAPSYNC_KAFKA_BOOTSTRAP": bootstrap, "HEAPSYNC_ADMIN_PORT": str(admin_port)}
    out = tmp_path / "dev.out"
    dev = subprocess.Popen([sys.executable, "-m", "heapsync_ops.cli", "dev", "--port", str(port), "--sim-port", str(sim_port),
                            "--broker", broker_kind],
                           cwd=tmp_path, env=env, stdout=open(out, "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + (90 if broker_kind == "tansu" else 240)  # a first Kafka run resolves it
        while "Ctrl-C stops everything" not in out.read_text() and time.monotonic() < deadline:
            assert dev.poll() is None, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert "demo account id:    demo" in text and "demo webhook secret:" in text
        assert f"http://127.0.0.1:{sim_port}/_sim/lists" in text
        label = "broker (Tansu):    " if broker_kind == "tansu" else f"broker (Apache Kafka {DEFAULT_KAFKA_VERSION}):"
        assert f"{label} {bootstrap}" in text
        assert f"webhook:            http://127.0.0.1:{port}/heap/listMembership/<accountId>" in text
        assert f"admin:              http://127.0.0.1:{admin_port}/status" in text  # both addresses printed
        assert http("GET", f"http://127.0.0.1:{admin_port}/status.json").status == 200
        assert http("GET", f"http://127.0.0.1:{port}/status.json").status == 404

        sample = subprocess.run(
            [sys.executable, "-m", "heapsync_ops.cli", "send-sample", "--url",
             f"http://127.0.0.1:{port}/heap/listMembership/demo"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert sample.returncode == 0, sample.stdout + sample.stderr
        assert sample.stdout.count(": 200 ") == 2, sample.stdout

        expected = ["user1@example.com", "user3@example.com", "user4@example.com"]
        members: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            members = http("GET", f"http://127.0.0.1:{sim_port}/_sim/lists").body.get("demo", {}).get("HeapTestSegment", [])
            if members == expected:
                break
            time.sleep(0.5)
        assert members == expected, (out.read_text(), (tmp_path / ".heapsync/dev/process.log").read_text()[-3000:])
        deadline = time.monotonic() + 10
        while "HeapTestSegment has 3 member(s)" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "HeapTestSegment has 3 member(s)" in out.read_text()

        status = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "status", "--json"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        applied = json.loads(status.stdout)["last_applied"]
        assert [(a["account"], a["list_name"], a["adds"], a["removes"]) for a in applied] == [
            ("demo", "HeapTestSegment", 3, 1)]
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            dev.kill()
    assert dev.returncode == 0, out.read_text()
    # the broker went last: the worker did not lose it while shutting down
    assert "Connect call failed" not in (tmp_path / ".heapsync/dev/process.log").read_text()
    deadline = time.monotonic() + 10
    while processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(tmp_path) == []


def test_dev_stops_with_the_reason_when_a_stage_cannot_start(tmp_path: Path) -> None:
    """A stage that exits while `heapsync dev` waits for its port: one line with its last log line,
    not a 30 s wait and a traceback; nothing left running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HEAPSYNC_")},
               "HEAPSYNC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
               "HEAPSYNC_ADMIN_PORT": str(taken.getsockname()[1])}
        result = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "dev", "--port", str(free_port()),
                                 "--sim-port", str(free_port())], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("stopping: ")]
    assert "ingest exited" in line and "admin listener cannot start" in line
    assert processes_in(tmp_path) == []
