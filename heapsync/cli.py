"""The ``heapsync`` command line. Each stage runs alone (``ingest``, ``process``,
``sink``) so it can be scaled on its own; ``dev`` runs them all on one machine."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import click

from heapsync import logs
from heapsync.settings import AccountError, Settings

DEV_DIR = Path(".heapsync/dev")


def _settings() -> Settings:
    return Settings()


def _accounts(settings: Settings) -> dict:
    try:
        return settings.accounts()
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(package_name="heapsync")
def cli() -> None:
    """heapsync: keep Cordial lists in sync with Heap segments."""


@cli.command()
@click.option("--port", type=int, default=None, help="Port to listen on (default HEAPSYNC_INGEST_PORT or 8080).")
@click.option("--host", default=None, help="Address to bind (default HEAPSYNC_INGEST_HOST or 127.0.0.1).")
def ingest(port: int | None, host: str | None) -> None:
    """Serve Heap's webhook and write accepted pages to Kafka."""
    from ingest import server

    settings = _settings()
    if port is not None:
        settings.ingest_port = port
    if host is not None:
        settings.ingest_host = host
    logs.setup(settings.log_level)
    server.run(settings, _accounts(settings))


@cli.command()
def process() -> None:
    """Run a Faust worker that assembles pages into deltas (run several for more partitions)."""
    import faust

    from processors.worker import create_app

    settings = _settings()
    logs.setup(settings.log_level)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()


@cli.command()
def sink() -> None:
    """Apply deltas to Cordial."""
    import signal

    # SIGTERM before the loop is up (still importing, connecting): nothing is in flight, exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import asyncio

    from heapsync.kafka import ensure_topics
    from sinks.cordial_sink import build_runner

    settings = _settings()
    logs.setup(settings.log_level)
    accounts = _accounts(settings)
    ensure_topics(settings)
    asyncio.run(build_runner(settings, accounts).run())


@cli.command()
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

    from sinks.cordial_simulator import CordialSimulator, SimConfig

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


@cli.command()
@click.option("--port", type=int, default=8080, show_default=True, help="Port of the ingress.")
@click.option("--sim-port", type=int, default=8081, show_default=True, help="Port of the Cordial simulator.")
def dev(port: int, sim_port: int) -> None:
    """Run the whole pipeline on this machine: broker, ingress, worker, sink, simulator."""
    from heapsync.dev import run_dev

    sys.exit(run_dev(port=port, sim_port=sim_port))


@cli.command("send-sample")
@click.option("--url", default=None, help="Webhook URL (default http://127.0.0.1:8080/heap/listMembership/ACCOUNT).")
@click.option("--account", default="demo", show_default=True)
@click.option("--secret", default=None, help="Heap webhook secret (default: the account's, from the accounts file).")
@click.option("--segment", default="Heap Test Segment", show_default=True)
@click.option("--encoding", type=click.Choice(["base64", "hex"]), default="base64", show_default=True)
def send_sample(url: str | None, account: str, secret: str | None, segment: str, encoding: str) -> None:
    """Post a correctly signed two-page sample sync and print the responses."""
    import urllib.error
    import urllib.request

    from heapsync.samples import sample_sync_pages
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

            found = load_accounts(path).get(account)
            if found is not None:
                return found.heap_webhook_secrets[0].get_secret_value()
    raise click.ClickException(f"no secret for account {account!r}: pass --secret or set HEAPSYNC_ACCOUNTS_FILE")


@cli.command()
@click.option("--write", is_flag=True, help="Write the schema file instead of printing it.")
def schema(write: bool) -> None:
    """Print (or write) the JSON Schema of the delta contract."""
    from heapsync.schema import SCHEMA_PATH, render

    text = render()
    if write:
        SCHEMA_PATH.write_text(text)
        click.echo(f"wrote {SCHEMA_PATH}")
    else:
        click.echo(text, nl=False)


@cli.command()
def topics() -> None:
    """Create any missing heapsync topic and list them."""
    from heapsync.kafka import ensure_topics

    settings = _settings()
    created = ensure_topics(settings)
    for name in settings.topics.all():
        click.echo(f"{name}{'  (created)' if name in created else ''}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
