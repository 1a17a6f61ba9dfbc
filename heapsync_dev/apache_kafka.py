"""A local Apache Kafka (KRaft) for ``heapsync kafka start``, ``heapsync dev --broker kafka``, tests and benchmarks.

Kafka comes from Maven as ordinary artifacts (``org.apache.kafka:kafka_2.13`` and what it needs
at run time), resolved once into a cache directory and reused; it runs on the machine's Java 17.
A cluster is N nodes, each a combined controller+broker (``process.roles=broker,controller``)
sharing one controller quorum, on free loopback ports, with data in a temporary folder unless
one is given. Each node can be killed (-9), stopped and restarted on the same data, which is
what the broker-fault tests need. Shape as :class:`heapsync_dev.broker.EmbeddedBroker`:
``start``/``stop``/``bootstrap``/context manager, so a test can take either.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heapsync_dev.processes import StopOnSignal, die_with_parent, free_port, stop_processes

DEFAULT_KAFKA_VERSION = "4.4.0"
"""The version production should run (docker-compose.yml pins the same); see docs/scale.md "Running on Apache Kafka"."""

TESTED_KAFKA_VERSIONS = ("3.9.0", DEFAULT_KAFKA_VERSION)
"""Versions the whole chain was run on: the 3.9 line compose used to pin, and the current 4.x."""

LOG4J2_VERSION = "2.25.3"
"""Logging backend for Kafka 4.x (which logs through log4j 2); 3.x logs through reload4j."""

CACHE_ENV = "HEAPSYNC_KAFKA_CACHE"
"""Root of the Maven-resolved Kafka runtimes, one folder per version (default ~/.cache/heapsync/kafka)."""

HEAP_ENV = "HEAPSYNC_KAFKA_HEAP"
"""Java heap of each node (-Xmx), e.g. 1g (default 768m)."""


class KafkaUnavailable(RuntimeError):
    """Java or Maven is missing, or Kafka could not be resolved or started: the message says which."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "heapsync" / "kafka")


def missing_tools() -> list[str]:
    """The programs a local Kafka needs that are not on PATH (``java``, ``mvn``)."""
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def major_version(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise KafkaUnavailable(f"not a Kafka version: {version!r} (e.g. {DEFAULT_KAFKA_VERSION})") from exc


def runtime_pom(version: str) -> str:
    """A pom whose runtime dependencies are what a broker needs: Kafka itself and a logging backend."""
    deps = [("org.apache.kafka", "kafka_2.13", version)]
    if major_version(version) >= 4:
        deps += [("org.apache.logging.log4j", a, LOG4J2_VERSION)
                 for a in ("log4j-api", "log4j-core", "log4j-slf4j-impl")]
    else:
        deps += [("org.slf4j", "slf4j-reload4j", "1.7.36")]
    body = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in deps)
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        f"  <groupId>heapsync</groupId><artifactId>kafka-runtime</artifactId><version>{version}</version>\n"
        "  <packaging>pom</packaging>\n"
        f"  <dependencies>\n{body}\n  </dependencies>\n"
        "</project>\n"
    )


LOG4J2_PROPERTIES = """\
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.config.name = org.apache.kafka.common.config
logger.config.level = warn
logger.kconfig.name = kafka.server.KafkaConfig
logger.kconfig.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
"""

LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.org.apache.kafka.common.config=WARN
log4j.logger.kafka.server.KafkaConfig=WARN
log4j.logger.state.change.logger=WARN
"""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One resolver per version at a time, across processes (tests, benchmarks and a shell may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(version: str = DEFAULT_KAFKA_VERSION, quiet: bool = True) -> Path:
    """The folder of ``version``'s runtime jars, resolved with Maven the first time and reused after.

    The jars are copied to a scratch folder and renamed into place, so an interrupted fetch never
    leaves a half-filled runtime that a later start would take for complete.
    """
    major_version(version)
    home = cache_root() / version
    libs = home / "libs"
    if (home / "complete").exists():
        return home
    if shutil.which("mvn") is None:
        raise KafkaUnavailable("Maven (mvn) is not on PATH: it resolves Apache Kafka's jars "
                               "(apt-get install -y maven openjdk-17-jdk-headless)")
    with _locked(home.parent / f"{version}.lock"):
        if (home / "complete").exists():
            return home
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(runtime_pom(version))
        scratch = home / "libs.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = ["mvn", "-B", *(["-q"] if quiet else []), "-f", str(home / "pom.xml"),
               "dependency:copy-dependencies", f"-DoutputDirectory={scratch}", "-DincludeScope=runtime"]
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        if done.returncode != 0 or not any(scratch.glob(f"kafka_2.13-{version}.jar")):
            detail = ((done.stdout or "") + (done.stderr or ""))[-2000:] if quiet else ""
            raise KafkaUnavailable(f"Maven could not resolve Apache Kafka {version} (exit {done.returncode})\n{detail}")
        shutil.rmtree(libs, ignore_errors=True)
        scratch.rename(libs)
        (home / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        (home / "log4j.properties").write_text(LOG4J_PROPERTIES)
        (home / "complete").write_text(f"{version}\n")
    return home


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding, as ``kafka-storage random-uuid``.

    Like Kafka's own ``Uuid.randomUuid`` it never starts with "-": the storage tool would read such
    an id as an option and refuse to format (1 start in 64).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def node_properties(node_id: int, *, host: str, port: int, controller_port: int, voters: str, log_dir: Path,
                    nodes: int, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """One combined controller+broker's server.properties, production-shaped (as docker-compose.yml).

    Internal topics get min(N, 3) replicas; with three or more nodes ``min.insync.replicas`` is 2, so
    a write acknowledged by all in-sync replicas survives the loss of any one broker.
    """
    replicas = min(nodes, 3)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min(replicas, 2)),
        "default.replication.factor": str(replicas),
        "min.insync.replicas": "2" if nodes >= 3 else "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "message.max.bytes": str(16 * 1024 * 1024),
        "replica.fetch.max.bytes": str(16 * 1024 * 1024),
        "unclean.leader.election.enable": "false",
    }
    props.update(overrides or {})
    return props


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


@dataclass
class KafkaNode:
    """One controller+broker process; keeps its ports and data across restarts."""

    node_id: int
    host: str
    port: int
    controller_port: int
    root: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "server.properties"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None


@dataclass
class KafkaCluster:
    """N Apache Kafka nodes in KRaft mode on loopback; ``with KafkaCluster(nodes=3) as k: k.bootstrap``."""

    nodes: int = 1
    version: str = DEFAULT_KAFKA_VERSION
    port: int | None = None
    """The first node's client port (the others take free ports); default a free port."""
    data_dir: Path | None = None
    """Where the nodes keep their data; given, it is kept (and reused if already formatted), else a temp folder."""
    log_dir: Path | None = None
    """Where each node's log goes (node-<id>.log); default beside its data."""
    host: str = "127.0.0.1"
    broker_config: dict[str, str] = field(default_factory=dict)
    """Extra server.properties for every node (they win over the defaults)."""
    heap: str = field(default_factory=lambda: os.environ.get(HEAP_ENV, "768m"))
    members: list[KafkaNode] = field(default_factory=list)
    kind: str = "kafka"
    _owned_dir: Path | None = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.members)

    @property
    def log_path(self) -> Path | None:
        """The first node's log (EmbeddedBroker has one log; see ``log_paths`` for all)."""
        return self.members[0].log_path if self.members else None

    @property
    def log_paths(self) -> dict[int, Path]:
        return {n.node_id: n.log_path for n in self.members}

    def node(self, node_id: int) -> KafkaNode:
        for n in self.members:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no Kafka node {node_id} (nodes are {[n.node_id for n in self.members]})")

    def pid(self, node_id: int) -> int | None:
        return self.node(node_id).pid

    # -- lifecycle --------------------------------------------------------------------------
    def _layout(self) -> Path:
        if self.data_dir is None:
            self._owned_dir = Path(tempfile.mkdtemp(prefix="heapsync-kafka-"))
            root = self._owned_dir
        else:
            root = Path(self.data_dir)
            root.mkdir(parents=True, exist_ok=True)
        logs = Path(self.log_dir) if self.log_dir is not None else root
        logs.mkdir(parents=True, exist_ok=True)
        ports = [self.port or free_port(self.host)] + [free_port(self.host) for _ in range(self.nodes - 1)]
        self.members = [
            KafkaNode(i, self.host, ports[i - 1], free_port(self.host), root / f"node-{i}", logs / f"node-{i}.log")
            for i in range(1, self.nodes + 1)
        ]
        return root

    def _java(self, home: Path, *args: str, heap: str) -> list[str]:
        return ["java", f"-Xmx{heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
                f"-Dlog4j.configuration=file:{home / 'log4j.properties'}",
                "-cp", str(home / "libs" / "*"), *args]

    def _configure(self, root: Path) -> None:
        """Write each node's server.properties and format its storage (once: an existing cluster is reused)."""
        id_file = root / "cluster.id"
        cluster_id = id_file.read_text().strip() if id_file.exists() else new_cluster_id()
        id_file.write_text(cluster_id + "\n")
        home = fetch(self.version)
        for n in self.members:
            n.root.mkdir(parents=True, exist_ok=True)
            saved = n.root / "ports"
            if saved.exists():  # a reused data dir keeps its ports: the quorum's addresses live in its metadata
                n.port, n.controller_port = (int(p) for p in saved.read_text().split())
        voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.members)
        for n in self.members:
            (n.root / "ports").write_text(f"{n.port} {n.controller_port}\n")
            _write_properties(n.config_path, node_properties(
                n.node_id, host=n.host, port=n.port, controller_port=n.controller_port, voters=voters,
                log_dir=n.data_dir, nodes=self.nodes, overrides=self.broker_config))
            if (n.data_dir / "meta.properties").exists():
                continue
            done = subprocess.run(
                self._java(home, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(n.config_path),
                           "--ignore-formatted", heap="256m"),
                capture_output=True, text=True)
            if done.returncode != 0:
                raise KafkaUnavailable(f"formatting node {n.node_id} failed:\n{(done.stdout + done.stderr)[-2000:]}")

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """Resolve (first time only), format, start every node, and wait until each serves metadata."""
        missing = missing_tools()
        if missing:
            raise KafkaUnavailable(f"{' and '.join(missing)} not on PATH: Apache Kafka needs Java 17 and Maven "
                                   "(apt-get install -y openjdk-17-jdk-headless maven)")
        root = self._layout()
        try:
            self._configure(root)
            for n in self.members:
                self._spawn(n)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, n: KafkaNode) -> None:
        home = fetch(self.version)
        out = open(n.log_path, "ab")
        try:
            n.process = subprocess.Popen(
                self._java(home, "kafka.Kafka", str(n.config_path), heap=self.heap),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                # its own session: a terminal's Ctrl-C reaches whoever started it, who stops Kafka
                # last, after the clients that still want to commit and flush through it
                start_new_session=True,
            )
        finally:
            out.close()

    def wait_ready(self, timeout: float = 90.0, node_ids: list[int] | None = None) -> None:
        """Until every (given) node answers metadata on its own port and the cluster lists all of them."""
        from confluent_kafka.admin import AdminClient

        wanted = [self.node(i) for i in node_ids] if node_ids else list(self.members)
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        for n in wanted:
            admin = AdminClient(_probe_config(n.bootstrap))
            while True:
                if n.process is not None and n.process.poll() is not None:
                    raise KafkaUnavailable(f"Kafka node {n.node_id} exited with {n.process.returncode} "
                                           f"(log: {n.log_path})\n{self.tail(n.node_id)}")
                try:
                    md = admin.list_topics(timeout=max(0.5, min(3.0, deadline - time.monotonic())))
                    seen = set(md.brokers)
                    if n.node_id in seen and {m.node_id for m in self.members if m.running} <= seen:
                        break
                    last_error = f"metadata lists brokers {sorted(seen)}"
                except Exception as exc:  # KafkaException: not up yet
                    last_error = str(exc)
                if time.monotonic() >= deadline:
                    raise KafkaUnavailable(f"Kafka node {n.node_id} not serving metadata after {timeout}s "
                                           f"({last_error}; log: {n.log_path})\n{self.tail(n.node_id)}")
                time.sleep(0.25)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every node (side by side), kill what is left after ``timeout``; remove a temp data folder."""
        stop_processes([n.process for n in self.members if n.process is not None], timeout)
        for n in self.members:
            n.process = None
        owned, self._owned_dir = self._owned_dir, None
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------------
    def kill(self, node_id: int) -> None:
        """kill -9 one node: no controlled shutdown, no flush (what a crash or power loss does)."""
        self.stop_node(node_id, sig=signal.SIGKILL)

    def stop_node(self, node_id: int, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        n = self.node(node_id)
        if n.process is not None:
            stop_processes([n.process], timeout, sig)
        n.process = None

    def start_node(self, node_id: int, timeout: float = 90.0, wait: bool = True) -> None:
        """Start a stopped or killed node again on its own data and ports."""
        n = self.node(node_id)
        if n.running:
            return
        self._spawn(n)
        if wait:
            self.wait_ready(timeout, [node_id])

    def restart(self, node_id: int, timeout: float = 90.0, kill: bool = False) -> None:
        (self.kill if kill else self.stop_node)(node_id)
        self.start_node(node_id, timeout)

    def leader(self, topic: str, partition: int = 0, timeout: float = 10.0) -> int | None:
        """The node id leading ``topic``/``partition`` now (None while it has no leader)."""
        from confluent_kafka.admin import AdminClient

        live = ",".join(n.bootstrap for n in self.members if n.running) or self.bootstrap
        md = AdminClient(_probe_config(live)).list_topics(topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None or partition not in t.partitions:
            return None
        leader = t.partitions[partition].leader
        return leader if leader >= 0 else None

    def tail(self, node_id: int, chars: int = 4000) -> str:
        """The end of one node's log, for a failing test to print."""
        path = self.node(node_id).log_path
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self, chars: int = 4000) -> str:
        return "\n".join(f"===== kafka node {n.node_id} ({n.log_path})\n{self.tail(n.node_id, chars)}"
                         for n in self.members)


def _probe_config(bootstrap: str) -> dict[str, Any]:
    """Admin clients that probe readiness: refused connections while a node boots are expected, so not logged."""
    return {"bootstrap.servers": bootstrap, "logger": _quiet}


_quiet = logging.getLogger("heapsync.apache_kafka.probe")
_quiet.disabled = True


def run_foreground(nodes: int = 1, version: str | None = None, port: int | None = None,
                   data_dir: Path | None = None) -> int:
    """``heapsync kafka start``: start, print where it is, run until Ctrl-C/SIGTERM (or a node dies), stop."""
    import sys

    from heapsync.settings import Settings
    from heapsync_dev.broker import dev_broker_port

    stop = StopOnSignal()
    version = version or DEFAULT_KAFKA_VERSION
    if port is None:
        port = dev_broker_port(Settings().kafka_bootstrap)
    cluster = KafkaCluster(nodes=nodes, version=version, port=port, data_dir=data_dir)
    if not (cache_root() / version / "complete").exists():
        print(f"resolving Apache Kafka {version} with Maven into {cache_root() / version} (first run only) ...",
              file=sys.stderr, flush=True)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        print(f"Apache Kafka did not start: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"Apache Kafka {version} is running: {nodes} node(s), KRaft, each a controller and a broker")
        for n in cluster.members:
            print(f"  node {n.node_id}: {n.bootstrap}  pid {n.pid}  data {n.data_dir}  log {n.log_path}")
        print(f"export HEAPSYNC_KAFKA_BOOTSTRAP={cluster.bootstrap}")
        print("Ctrl-C stops every node.")
        sys.stdout.flush()
        while not stop:
            time.sleep(0.5)
            dead = [n for n in cluster.members if not n.running]
            if dead:
                print(f"stopping: node {dead[0].node_id} exited (see {dead[0].log_path})", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping Apache Kafka ...", file=sys.stderr, flush=True)
        cluster.stop()
        print("stopped", file=sys.stderr, flush=True)
