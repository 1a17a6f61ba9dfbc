"""The dev-only commands of the ``heapsync`` command line: ``dev``, ``simulator``, ``kafka`` and ``send-sample``.

They are registered through the ``heapsync.commands`` entry point (see pyproject.toml), so the CLI
(:mod:`heapsync_ops.cli`) lists them when this package is installed and never imports it: an image
without the dev tooling simply lacks these commands.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import click

from heapsync import logs
from heapsync.settings import AccountError
from heapsync_ops.cli import DEV_DIR, ConfigError, _accounts, _settings


@click.command()
@click.option("--port", type=int, default=8081, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--account", "accounts", multiple=True, metavar="LABEL=API_KEY",
              help="An account the simulator knows (repeatable). Default: demo=demo-cordial-key.")
@click.option("--latency", type=float, default=0.0, help="Seconds added to every API call.")
@click.option("--rate-limit", type=float, default=None, help="Requests per second per API key (429 above).")
@click.option("--error-rate", type=float, default=0.0, help="Share of API calls answered 503.")
@click.option("--outage", "outages", multiple=True, metavar="START:SECONDS",
              help="Answer every API call 503 from START for SECONDS (seconds after start; repeatable).")
@click.option("--import-step", type=float, default=0.2, show_default=True,
              help="Seconds a contact import job spends in each of Scheduled, Pending, Processing.")
@click.option("--seed", type=int, default=None, help="Seed for the error-rate dice.")
def simulator(port: int, host: str, accounts: tuple[str, ...], latency: float, rate_limit: float | None,
              error_rate: float, outages: tuple[str, ...], import_step: float, seed: int | None) -> None:
    """Run the local Cordial simulator (state at /_sim/state and /_sim/lists)."""
    from aiohttp import web

    from heapsync_dev.cordial_simulator import CordialSimulator, SimConfig

    keys = dict(a.split("=", 1) for a in accounts) if accounts else {"demo": "demo-cordial-key"}
    try:
        windows = [(float(o.split(":")[0]), float(o.split(":")[1])) for o in outages]
    except (IndexError, ValueError) as exc:
        raise click.BadParameter("--outage takes START:SECONDS, e.g. 10:30") from exc
    sim = CordialSimulator(keys, SimConfig(latency_seconds=latency, rate_limit_per_second=rate_limit,
                                           error_rate=error_rate, outages=windows,
                                           import_step_seconds=import_step, seed=seed))
    logs.setup(_settings().log_level)
    web.run_app(sim.app(), host=host, port=port, print=None, access_log=None)


@click.command()
@click.option("--port", type=int, default=8080, show_default=True, help="Port of the ingress.")
@click.option("--sim-port", type=int, default=8081, show_default=True, help="Port of the Cordial simulator.")
@click.option("--broker", "broker_kind", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True,
              help="Embedded Tansu (no Java needed) or a single-node Apache Kafka (Java 17 and Maven).")
def dev(port: int, sim_port: int, broker_kind: str) -> None:
    """Run the whole pipeline on this machine: broker, ingress, worker, sink, simulator."""
    from heapsync_dev.pipeline import run_dev

    settings = _settings()
    if os.environ.get("HEAPSYNC_ACCOUNTS_FILE"):  # used as is (else a demo one is written): checked first
        _accounts(settings)
    sys.exit(run_dev(port=port, sim_port=sim_port, broker_kind=broker_kind))


@click.group()
def kafka() -> None:
    """A local Apache Kafka (KRaft) resolved with Maven and run on Java 17: for dev, tests and benchmarks."""


_kafka_version = click.option("--version", "version", default=None, metavar="VERSION",
                              help="Apache Kafka version (default the one production pins, see docs/scale.md).")


@kafka.command("fetch")
@_kafka_version
def kafka_fetch(version: str | None) -> None:
    """Resolve Apache Kafka's jars with Maven into the cache (HEAPSYNC_KAFKA_CACHE) and print where."""
    from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION, KafkaUnavailable, fetch

    try:
        click.echo(f"resolving Apache Kafka {version or DEFAULT_KAFKA_VERSION} with Maven (once; then cached) ...")
        home = fetch(version or DEFAULT_KAFKA_VERSION)
    except KafkaUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Apache Kafka {version or DEFAULT_KAFKA_VERSION}: {home / 'libs'}")


@kafka.command("start")
@click.option("--nodes", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Nodes in the KRaft cluster, each a controller and a broker.")
@_kafka_version
@click.option("--port", type=int, default=None,
              help="Client port of the first node (default the port of HEAPSYNC_KAFKA_BOOTSTRAP if free, else any).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep data here (reused on the next start); default a temporary folder removed at exit.")
def kafka_start(nodes: int, version: str | None, port: int | None, data_dir: Path | None) -> None:
    """Run Apache Kafka in the foreground until Ctrl-C, then stop every node."""
    from heapsync_dev.apache_kafka import run_foreground

    sys.exit(run_foreground(nodes=nodes, version=version, port=port, data_dir=data_dir))


@click.command("send-sample")
@click.option("--url", default=None, help="Webhook URL (default http://127.0.0.1:8080/heap/listMembership/ACCOUNT).")
@click.option("--account", default="demo", show_default=True)
@click.option("--secret", default=None, help="Heap webhook secret (default: the account's, from the accounts file).")
@click.option("--segment", default="Heap Test Segment", show_default=True)
@click.option("--encoding", type=click.Choice(["base64", "hex"]), default="base64", show_default=True)
def send_sample(url: str | None, account: str, secret: str | None, segment: str, encoding: str) -> None:
    """Post a correctly signed two-page sample sync and print the responses."""
    import urllib.error
    import urllib.request

    from heapsync_dev.samples import sample_sync_pages
    from ingest.signature import heap_hash_header

    if secret is None:
        secret = _default_secret(account)
    url = url or f"http://127.0.0.1:8080/heap/listMembership/{account}"
    task = str(uuid.uuid4())
    failed = False
    for body in sample_sync_pages(task, segment):
        raw = json.dumps(body).encode()
        header = heap_hash_header(secret.encode(), int(time.time() * 1000), raw, encoding)
        req = urllib.request.Request(url, data=raw, method="POST",
                                     headers={"Content-Type": "application/json", "Heap-Hash": header})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
            failed = True
        except urllib.error.URLError as exc:
            raise click.ClickException(f"cannot reach {url}: {exc.reason}") from exc
        page = body["data"]["sync_info"]
        click.echo(f"page {page['page_number']}/{page['total_pages']} of sync {task}: {status} {text}")
    if failed:
        sys.exit(1)


def _default_secret(account: str) -> str:
    settings = _settings()
    for path in (settings.accounts_file, DEV_DIR / "accounts.toml"):
        if path.exists():
            from heapsync.settings import load_accounts

            try:
                found = load_accounts(path).get(account)
            except AccountError as exc:
                raise ConfigError(str(exc)) from None
            if found is not None:
                return found.heap_webhook_secrets[0].get_secret_value()
    raise click.ClickException(f"no secret for account {account!r}: pass --secret or set HEAPSYNC_ACCOUNTS_FILE")
