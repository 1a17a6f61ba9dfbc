"""Shared fixtures: a real broker (Tansu, Apache Kafka or each in turn), and the pipeline's stages as real processes.

``--broker tansu|kafka|both`` (or HEAPSYNC_TEST_BROKERS) picks the brokers; every test that uses
the ``broker`` fixture runs once per broker (ids ``tansu``/``kafka``). Every integration test gets
its own topic prefix and consumer groups on the shared broker, so tests do not see each other's records. Every process a test
starts is stopped by its pid at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION, KafkaCluster, KafkaUnavailable, missing_tools
from heapsync_dev.broker import EmbeddedBroker
from heapsync_dev.cordial_simulator import CordialSimulator, SimConfig
from heapsync_dev.processes import die_with_parent, free_port, stop_process, wait_for_port
from ingest.signature import heap_hash_header

# Speed is measured in benchmarks, not tests: on a loaded 2-core machine a slow example is not a failure.
hypothesis_settings.register_profile("heapsync", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("heapsync")

Broker = EmbeddedBroker | KafkaCluster
"""What the ``broker`` fixture yields: Tansu or Apache Kafka, both with ``bootstrap``, ``kind``, ``start``/``stop``."""


BROKER_KINDS = ("tansu", "kafka")
BROKERS_ENV = "HEAPSYNC_TEST_BROKERS"
REQUIRE_KAFKA_ENV = "HEAPSYNC_TEST_REQUIRE_KAFKA"
_BROKERS = pytest.StashKey[list[str]]()
_NOTE = pytest.StashKey[str | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--broker", choices=[*BROKER_KINDS, "both"], default=None,
                     help=f"Broker(s) the real-chain tests run on (default: ${BROKERS_ENV}, else both when "
                          "java and mvn are on PATH, else tansu).")


def selected_brokers(config: pytest.Config) -> tuple[list[str], str | None]:
    """The brokers to run on, and the one line to print when the Kafka tier is left out by default."""
    choice = config.getoption("--broker") or os.environ.get(BROKERS_ENV, "").strip()
    if choice:
        if choice not in (*BROKER_KINDS, "both"):
            raise pytest.UsageError(f"{BROKERS_ENV}={choice!r}: choose tansu, kafka or both")
        return (list(BROKER_KINDS) if choice == "both" else [choice]), None
    missing = missing_tools()
    if os.environ.get(REQUIRE_KAFKA_ENV) == "1":
        if missing:
            raise pytest.UsageError(f"{REQUIRE_KAFKA_ENV}=1 but {' and '.join(missing)} not on PATH: "
                                    "the Apache Kafka tier cannot run")
        return list(BROKER_KINDS), None
    if missing:
        return ["tansu"], (f"Apache Kafka tier skipped: {' and '.join(missing)} not on PATH "
                           "(install Java 17 and Maven to run every real-chain test on Kafka too)")
    return list(BROKER_KINDS), None


def pytest_configure(config: pytest.Config) -> None:
    brokers, note = selected_brokers(config)
    config.stash[_BROKERS] = brokers
    config.stash[_NOTE] = note


def pytest_sessionstart(session: pytest.Session) -> None:
    note = session.config.stash.get(_NOTE, None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if note and reporter is not None:
        reporter.write_line(note, yellow=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses the ``broker`` fixture (directly or through ``pipeline``) runs on each selected broker;
    a test that asks for ``broker_kind`` gets each selected kind's name instead."""
    brokers = metafunc.config.stash[_BROKERS]
    if "broker" in metafunc.fixturenames:
        metafunc.parametrize("broker", brokers, ids=brokers, indirect=True, scope="session")
    elif "broker_kind" in metafunc.fixturenames:  # tests that start their own broker of each kind (e.g. `dev`)
        metafunc.parametrize("broker_kind", brokers, ids=brokers)


@pytest.fixture
def kafka_tier(request: pytest.FixtureRequest) -> None:
    """For tests of the Apache Kafka launcher itself: they run when the Kafka tier is selected."""
    if "kafka" not in request.config.stash[_BROKERS]:
        pytest.skip("the Apache Kafka tier is not selected (--broker, HEAPSYNC_TEST_BROKERS)")


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker per kind for the whole session; tests isolate themselves by topic prefix and group."""
    kind = getattr(request, "param", "tansu")
    logs = tmp_path_factory.mktemp(f"broker-{kind}")
    if kind == "tansu":
        with EmbeddedBroker(log_path=logs / "tansu.log") as b:
            yield b
        return
    cluster = KafkaCluster(nodes=1, log_dir=logs,
                           version=os.environ.get("HEAPSYNC_TEST_KAFKA_VERSION") or DEFAULT_KAFKA_VERSION)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        if os.environ.get(REQUIRE_KAFKA_ENV) == "1":
            pytest.exit(f"Apache Kafka could not start and {REQUIRE_KAFKA_ENV}=1: {exc}", returncode=3)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> str:
    """A topic made up front, as `heapsync topics` does in production (Apache Kafka here does not auto-create)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
    return name


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.popen, timeout, sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class HttpResult:
    status: int
    body: Any
    headers: dict[str, str]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> HttpResult:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return HttpResult(status, parsed, hdrs)


@dataclass
class Pipeline:
    """One isolated heapsync deployment on the shared broker, run as real processes."""

    broker: Broker
    workdir: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    procs: list[Proc] = field(default_factory=list)
    ingest_port: int = field(default_factory=free_port)
    sim_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    secret: str = "test-webhook-secret"
    cordial_key: str = "test-cordial-key"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def accounts_file(self) -> Path:
        return self.workdir / "accounts.toml"

    def write_accounts(self, text: str | None = None) -> None:
        self.accounts_file.write_text(text or (
            "[accounts.acme]\n"
            f'heap_webhook_secrets = ["{self.secret}"]\n'
            f'cordial_api_key = "{self.cordial_key}"\n'
            f'cordial_base_url = "{self.sim_url}/v2"\n'
        ))

    def env(self, **overrides: str) -> dict[str, str]:
        if not self.accounts_file.exists():
            self.write_accounts()
        return {
            **os.environ,
            "HEAPSYNC_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "HEAPSYNC_TOPIC_PREFIX": self.prefix,
            "HEAPSYNC_TOPIC_PARTITIONS": "3",
            "HEAPSYNC_ACCOUNTS_FILE": str(self.accounts_file),
            "HEAPSYNC_PROCESSOR_GROUP": f"{self.prefix}-assembler",
            "HEAPSYNC_PROCESSOR_DATA_DIR": str(self.workdir / "processor"),
            "HEAPSYNC_SINK_GROUP": f"{self.prefix}-sink",
            "HEAPSYNC_SINK_BACKOFF_MAX_SECONDS": "2",
            "HEAPSYNC_ADMIN_PORT": str(self.admin_port),
            "HEAPSYNC_LOG_LEVEL": "INFO",
            **self.extra_env,
            **overrides,
        }

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "heapsync_ops.cli", *args], env=env or self.env(),
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_simulator(self, *extra: str) -> Proc:
        proc = self.start("simulator", "simulator", "--port", str(self.sim_port),
                          "--account", f"acme={self.cordial_key}", *extra)
        wait_for_port("127.0.0.1", self.sim_port, 30)
        return proc

    def start_ingest(self) -> Proc:
        proc = self.start("ingest", "ingest", "--port", str(self.ingest_port))
        wait_for_port("127.0.0.1", self.ingest_port, 30)
        wait_for_port("127.0.0.1", self.admin_port, 30)
        return proc

    def start_all(self) -> None:
        self.start_simulator()
        self.start_ingest()
        self.start("process", "process")
        self.start("sink", "sink")

    def post(self, payload: dict[str, Any] | bytes, *, account: str = "acme", secret: str | None = None,
             ts_ms: int | None = None, encoding: str = "base64", headers: dict[str, str] | None = None) -> HttpResult:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json",
                "Heap-Hash": heap_hash_header((secret or self.secret).encode(),
                                              ts_ms if ts_ms is not None else int(time.time() * 1000), raw, encoding)}
        hdrs.update(headers or {})
        return http("POST", f"http://127.0.0.1:{self.ingest_port}/heap/listMembership/{account}", raw, hdrs)

    def lists(self) -> dict[str, list[str]]:
        return http("GET", f"{self.sim_url}/_sim/lists").body.get("acme", {})

    def wait_for_members(self, list_name: str, expected: set[str], timeout: float = 120.0) -> set[str]:
        """Poll the simulator until the list holds exactly ``expected`` (or time runs out)."""
        deadline = time.monotonic() + timeout
        members: set[str] = set()
        while time.monotonic() < deadline:
            members = set(self.lists().get(list_name, []))
            if members == expected:
                return members
            time.sleep(0.5)
        return members

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log.name})\n{p.output()[-4000:]}" for p in self.procs)


@pytest.fixture
def pipeline(broker: Broker, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(broker, tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


SIM_KEYS = {"a": "key-a", "b": "key-b"}
"""Cordial API keys of the two accounts the in-process simulator knows."""


@asynccontextmanager
async def simulator_server(import_step_seconds: float) -> AsyncIterator[tuple[CordialSimulator, str]]:
    """The Cordial simulator served on a free loopback port in this event loop; yields it and its root URL."""
    from aiohttp.test_utils import TestServer

    sim = CordialSimulator(SIM_KEYS, SimConfig(import_step_seconds=import_step_seconds))
    server = TestServer(sim.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield sim, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
