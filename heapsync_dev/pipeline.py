"""``heapsync dev``: the whole pipeline as child processes of one command.

Starts the broker (Tansu, or with ``--broker kafka`` a single-node Apache Kafka), the
Cordial simulator, the ingress, a Faust worker and the sink; prints where everything is;
on Ctrl-C or SIGTERM stops every process it started (and children die with it if it is
killed: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from heapsync.settings import Settings
from heapsync_dev.apache_kafka import KafkaCluster, KafkaUnavailable
from heapsync_dev.broker import EmbeddedBroker, dev_broker_port
from heapsync_dev.processes import StopOnSignal, die_with_parent, free_port, stop_processes, wait_for_port

DEV_DIR = Path(".heapsync/dev")
DEMO_ACCOUNT = "demo"
DEMO_CORDIAL_KEY = "demo-cordial-key"


def write_demo_accounts(path: Path, sim_url: str) -> str:
    secret = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by `heapsync dev`: a demo account pointed at the local Cordial simulator.\n"
        f"[accounts.{DEMO_ACCOUNT}]\n"
        f'heap_webhook_secrets = ["{secret}"]\n'
        f'cordial_api_key = "{DEMO_CORDIAL_KEY}"\n'
        f'cordial_base_url = "{sim_url}/v2"\n'
    )
    path.chmod(0o600)
    return secret


class Children:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "heapsync_ops.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        stop_processes([p for _, p in reversed(self.procs)], timeout)


def _sim_lists(sim_url: str) -> dict[str, dict[str, list[str]]]:
    try:
        with urllib.request.urlopen(f"{sim_url}/_sim/lists", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


def make_broker(kind: str, bootstrap: str) -> EmbeddedBroker | KafkaCluster:
    """The dev broker where the settings point: Tansu (in memory) or a single-node Apache Kafka (temp data)."""
    port = dev_broker_port(bootstrap)
    if kind == "kafka":
        return KafkaCluster(nodes=1, port=port, log_dir=DEV_DIR)
    return EmbeddedBroker(port=port, log_path=DEV_DIR / "broker.log")


def broker_label(broker: EmbeddedBroker | KafkaCluster) -> str:
    return f"Apache Kafka {broker.version}" if isinstance(broker, KafkaCluster) else "Tansu"


def _wait_listening(children: Children, addresses: list[tuple[str, int]], timeout: float = 30.0) -> str | None:
    """None once every address accepts connections; else what went wrong, with the last line of
    the log of a child that exited meanwhile (no 30 s wait for a port its process will never open)."""
    deadline = time.monotonic() + timeout
    for host, port in addresses:
        while True:
            dead = children.dead()
            if dead:
                log = children.log_dir / f"{dead[0]}.log"
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                return f"{dead[0]} exited (see {log}): {lines[-1][:500] if lines else ''}"
            try:
                wait_for_port(host, port, min(0.5, max(0.1, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return f"nothing listening on {host}:{port} after {timeout:.0f} s (see {children.log_dir}/)"
    return None


def run_dev(port: int = 8080, sim_port: int = 8081, broker_kind: str = "tansu") -> int:
    DEV_DIR.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    stop = StopOnSignal()

    # Tansu keeps its data in memory and the dev Kafka in a temporary folder: a fresh broker means the
    # worker's RocksDB state of an earlier run describes topics that no longer exist, so it goes too.
    shutil.rmtree(DEV_DIR / "processor", ignore_errors=True)
    broker = make_broker(broker_kind, settings.kafka_bootstrap)
    children = Children(DEV_DIR)
    try:
        if isinstance(broker, KafkaCluster):
            print(f"starting Apache Kafka {broker.version} (the first run resolves it with Maven) ...",
                  file=sys.stderr, flush=True)
        try:
            broker.start()
        except KafkaUnavailable as exc:
            print(f"Apache Kafka did not start: {exc}", file=sys.stderr)
            return 1
        sim_url = f"http://127.0.0.1:{sim_port}"
        env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": broker.bootstrap,
               "HEAPSYNC_PROCESSOR_DATA_DIR": str(DEV_DIR / "processor"),
               "HEAPSYNC_INGEST_PORT": str(port)}
        accounts_file = Path(os.environ.get("HEAPSYNC_ACCOUNTS_FILE", ""))
        demo_secret = None
        if not os.environ.get("HEAPSYNC_ACCOUNTS_FILE"):
            accounts_file = DEV_DIR / "accounts.toml"
            demo_secret = write_demo_accounts(accounts_file, sim_url)
        env["HEAPSYNC_ACCOUNTS_FILE"] = str(accounts_file.resolve())

        children.start("simulator", ["simulator", "--port", str(sim_port),
                                     "--account", f"{DEMO_ACCOUNT}={DEMO_CORDIAL_KEY}"], env)
        from heapsync.kafka import ensure_topics

        ensure_topics(Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=settings.topic_prefix,
                               topic_partitions=settings.topic_partitions))
        children.start("ingest", ["ingest", "--port", str(port)], env)
        children.start("process", ["process"], env)
        children.start("sink", ["sink"], env)
        listening = [("127.0.0.1", sim_port), ("127.0.0.1", port)]
        if settings.admin_port:
            listening.append((settings.admin_host if settings.admin_host not in ("0.0.0.0", "::") else "127.0.0.1",
                              settings.admin_port))
        problem = _wait_listening(children, listening)
        if problem is not None:
            print(f"stopping: {problem}", file=sys.stderr)
            return 1

        print(f"heapsync dev is running (logs in {DEV_DIR}/)")
        label = f"  broker ({broker_label(broker)}):"
        print(f"{label.ljust(21)} {broker.bootstrap}")
        if broker.bootstrap != settings.kafka_bootstrap:
            print(f"  (not at {settings.kafka_bootstrap}, which is taken or not local: for heapsync "
                  f"status/replay/dlq in another shell, export HEAPSYNC_KAFKA_BOOTSTRAP={broker.bootstrap})")
        print(f"  webhook:            http://127.0.0.1:{port}/heap/listMembership/<accountId>")
        if settings.admin_port:  # the ingress's admin listener (HEAPSYNC_ADMIN_HOST / HEAPSYNC_ADMIN_PORT)
            admin = f"http://{settings.admin_host}:{settings.admin_port}"
            print(f"  admin:              {admin}/status  (also {admin}/metrics, {admin}/openapi.json)")
        print(f"  Cordial simulator:  {sim_url}/v2  (lists and members: {sim_url}/_sim/lists)")
        print(f"  accounts file:      {accounts_file}")
        if demo_secret is not None:
            print(f"  demo account id:    {DEMO_ACCOUNT}")
            print(f"  demo webhook secret: {demo_secret}")
        print("Send a sample sync from another shell:  .venv/bin/heapsync send-sample")
        print("Lag, open syncs, dead letters, last applied per list:  .venv/bin/heapsync status")
        print("The Faust worker needs a few seconds to join its group before deltas flow. Ctrl-C stops everything.")
        sys.stdout.flush()

        last: dict[str, dict[str, int]] = {}
        while not stop:
            time.sleep(1.0)
            dead = children.dead()
            if dead:
                print(f"stopping: {', '.join(dead)} exited (see {DEV_DIR}/<name>.log)", file=sys.stderr)
                return 1
            current = {acct: {name: len(m) for name, m in lists.items()} for acct, lists in _sim_lists(sim_url).items()}
            if current != last:
                for acct, lists in current.items():
                    for name, count in lists.items():
                        if last.get(acct, {}).get(name) != count:
                            print(f"[simulator] account {acct}: list {name} has {count} member(s)")
                sys.stdout.flush()
                last = current
        return 0
    finally:
        print("stopping heapsync dev ...", file=sys.stderr)
        children.stop()
        broker.stop()
        print("stopped", file=sys.stderr)


__all__ = ["run_dev", "free_port"]
