"""The ``heapsync`` command line. Each stage runs alone (``ingest``, ``process``,
``sink``) so it can be scaled on its own; ``dev`` runs them all on one machine."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from heapsync import logs
from heapsync.settings import Account, AccountError, Settings, settings_problems

P = ParamSpec("P")
R = TypeVar("R")

DEV_DIR = Path(".heapsync/dev")


class ConfigError(click.ClickException):
    """A setting or the accounts file is invalid: one line on stderr, exit status 2, nothing started."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the parser's message held


def _settings() -> Settings:
    """Settings from the environment; an invalid value is a ``ConfigError`` (no traceback)."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"settings: {settings_problems(exc)}") from None


def _accounts(settings: Settings) -> dict[str, Account]:
    try:
        return settings.accounts()
    except AccountError as exc:
        raise ConfigError(str(exc)) from None


def _checked(require_accounts: bool = False) -> tuple[Settings, dict[str, Account]]:
    """The check every command that runs the pipeline or reads its topics makes before it starts anything.

    Settings are validated; so is the accounts file when the command needs it, when
    HEAPSYNC_ACCOUNTS_FILE names one, or when the default one exists: a typo in it is one line
    naming the file, the account and the key, exit status 2, instead of a stage dying later.
    """
    settings = _settings()
    if require_accounts or os.environ.get("HEAPSYNC_ACCOUNTS_FILE") or settings.accounts_file.exists():
        return settings, _accounts(settings)
    return settings, {}


def _echo_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _broker_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """An operator command meets an unreachable broker with one clear line, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from confluent_kafka import KafkaException

        try:
            return fn(*args, **kwargs)
        except KafkaException as exc:
            raise click.ClickException(f"Kafka at {_settings().kafka_bootstrap}: {exc}") from exc

    return wrapper


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

    settings, accounts = _checked(require_accounts=True)
    if port is not None:
        settings.ingest_port = port
    if host is not None:
        settings.ingest_host = host
    logs.setup(settings.log_level)
    server.run(settings, accounts)


@cli.command()
def process() -> None:
    """Run a Faust worker that assembles pages into deltas (run several for more partitions)."""
    import faust
    from confluent_kafka import KafkaException

    from processors.worker import create_app, declare_changelogs

    settings, _ = _checked()
    logs.setup(settings.log_level)
    app = create_app(settings)
    try:
        declare_changelogs(app, settings)
    except KafkaException as exc:  # Faust declares them itself as it starts, as before
        logging.getLogger("heapsync.processor").warning("changelog topics not created ahead of the worker",
                                                         extra={"error": str(exc)[:200]})
    # override_logging=False keeps our JSON lines (with their fields); mode would replace the handler
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True, override_logging=False)
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

    settings, accounts = _checked(require_accounts=True)
    logs.setup(settings.log_level)
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
@click.option("--broker", "broker_kind", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True,
              help="Embedded Tansu (no Java needed) or a single-node Apache Kafka (Java 17 and Maven).")
def dev(port: int, sim_port: int, broker_kind: str) -> None:
    """Run the whole pipeline on this machine: broker, ingress, worker, sink, simulator."""
    from heapsync.dev import run_dev

    settings = _settings()
    if os.environ.get("HEAPSYNC_ACCOUNTS_FILE"):  # used as is (else a demo one is written): checked first
        _accounts(settings)
    sys.exit(run_dev(port=port, sim_port=sim_port, broker_kind=broker_kind))


@cli.group()
def kafka() -> None:
    """A local Apache Kafka (KRaft) resolved with Maven and run on Java 17: for dev, tests and benchmarks."""


_kafka_version = click.option("--version", "version", default=None, metavar="VERSION",
                              help="Apache Kafka version (default the one production pins, see README).")


@kafka.command("fetch")
@_kafka_version
def kafka_fetch(version: str | None) -> None:
    """Resolve Apache Kafka's jars with Maven into the cache (HEAPSYNC_KAFKA_CACHE) and print where."""
    from heapsync.apache_kafka import DEFAULT_KAFKA_VERSION, KafkaUnavailable, fetch

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
    from heapsync.apache_kafka import run_foreground

    sys.exit(run_foreground(nodes=nodes, version=version, port=port, data_dir=data_dir))


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

            try:
                found = load_accounts(path).get(account)
            except AccountError as exc:
                raise ConfigError(str(exc)) from None
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
@click.option("--create/--no-create", default=True, show_default=True,
              help="Create missing topics with explicit settings (partitions, retention, cleanup policy).")
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def topics(create: bool, as_json: bool) -> None:
    """Create any missing heapsync topic, and show each with partitions, retention and cleanup policy."""
    from heapsync.topics_admin import describe

    settings, _ = _checked()
    logs.setup("WARNING")
    rows = describe(settings, create=create)
    if as_json:
        _echo_json(rows)
        return
    from heapsync.ops_render import render_topics

    render_topics(rows)


# --------------------------------------------------------------------------
# Operations: replay, dead letters, status, archive (see README "Runbooks")
# --------------------------------------------------------------------------




@cli.command()
@click.argument("kind", type=click.Choice(["pages", "deltas"]))
@click.option("--since", default=None, metavar="TIME",
              help="Replay records written at or after this time: ISO 8601 (2026-11-24T05:00:00Z; naive = UTC) "
                   "or a span back from now (90m, 2h, 1d12h).")
@click.option("--from-offset", type=int, default=None, help="Replay from this offset in every partition.")
@click.option("--account", default=None, help="Only this account.")
@click.option("--segment", default=None, help="Only this segment (id or name; for deltas also the list name).")
@click.option("--include-replays", is_flag=True, help="Also replay records that are themselves replays.")
@click.option("--dry-run", is_flag=True, help="Only say what would be replayed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_broker_errors
def replay(kind: str, since: str | None, from_offset: int | None, account: str | None, segment: str | None,
           include_replays: bool, dry_run: bool, as_json: bool) -> None:
    """Re-drive a range of the pages topic (through the assembler) or the deltas topic (through the sinks)."""
    from heapsync.replay import Filter, ReplayError, parse_since, run_replay

    if (since is None) == (from_offset is None):
        raise click.UsageError("give exactly one of --since or --from-offset")
    try:
        since_ms = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO 8601 time or a span like 2h: {since}", param_hint="--since") from exc
    settings, _ = _checked()
    logs.setup("WARNING")
    try:
        report = run_replay(settings, kind, since_ms=since_ms, from_offset=from_offset,  # type: ignore[arg-type]
                            flt=Filter(account, segment, include_replays), dry_run=dry_run,
                            progress=sys.stderr.isatty() and not as_json)
    except ReplayError as exc:
        raise click.ClickException(f"{exc} (replay id {exc.report.replay_id}; "
                                   f"{exc.report.produced} delivered: re-running the replay is safe)") from exc
    if as_json:
        _echo_json(report.as_json())
        return
    from heapsync.ops_render import render_replay

    render_replay(report)


@cli.group()
def dlq() -> None:
    """Dead letters: list, show and re-drive them (rejected requests, assembler, sink)."""


_dlq_topic = click.option("--topic", "sources", multiple=True, type=click.Choice(["rejected", "assembler", "sink"]),
                          help="Which dead-letter topic (repeatable; default all three).")
_dlq_account = click.option("--account", default=None, help="Only entries of this account.")
_dlq_reason = click.option("--reason", default=None, help="Only entries whose reason contains this text.")


def _dlq_entries(sources: tuple[str, ...], account: str | None, reason: str | None) -> tuple[list, dict]:
    from heapsync import dlq as dlq_mod

    settings, _ = _checked()
    entries = dlq_mod.load(settings, sources or dlq_mod.SOURCES)  # type: ignore[arg-type]
    marks = dlq_mod.load_marks(settings)
    return [e for e in entries if dlq_mod.matches(e, account=account, reason=reason)], marks


@dlq.command("list")
@_dlq_topic
@_dlq_account
@_dlq_reason
@click.option("--all", "show_all", is_flag=True, help="Also entries already re-driven.")
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def dlq_list(sources: tuple[str, ...], account: str | None, reason: str | None, show_all: bool, as_json: bool) -> None:
    """List dead-letter entries (pending and failed re-drives; --all for every one)."""
    from heapsync.dlq import state_of

    logs.setup("WARNING")
    entries, marks = _dlq_entries(sources, account, reason)
    rows = [{"id": e.id, "at": e.at.isoformat(timespec="seconds"), "account": e.account, "reason": e.reason,
             "summary": e.summary, "state": state_of(e, marks)} for e in entries]
    rows = [r for r in rows if show_all or r["state"] != "redriven"]
    if as_json:
        _echo_json(rows)
        return
    from heapsync.ops_render import render_rows

    render_rows("dead letters", rows, ["id", "at", "account", "reason", "summary", "state"])


@dlq.command("show")
@click.argument("entry_id")
@_broker_errors
def dlq_show(entry_id: str) -> None:
    """Print one entry in full (ENTRY_ID as in `dlq list`, e.g. sink:0:12). It may hold user ids."""
    from heapsync.dlq import state_of

    logs.setup("WARNING")
    source = entry_id.split(":", 1)[0]
    if source not in ("rejected", "assembler", "sink"):
        raise click.BadParameter("an id looks like rejected:0:12, assembler:1:3 or sink:2:40", param_hint="ENTRY_ID")
    entries, marks = _dlq_entries((source,), None, None)
    found = next((e for e in entries if e.id == entry_id), None)
    if found is None:
        raise click.ClickException(f"no dead-letter entry {entry_id}")
    _echo_json({"id": found.id, "at": found.at.isoformat(), "state": state_of(found, marks),
                "redrive": mark.model_dump(mode="json") if (mark := marks.get(found.mark_key)) else None,
                "entry": found.doc})


@dlq.command("redrive")
@_dlq_topic
@_dlq_account
@_dlq_reason
@click.option("--id", "ids", multiple=True, help="Only these entries (repeatable).")
@click.option("--force", is_flag=True,
              help="Also entries already re-driven, and sync content whose segment had a newer sync since "
                   "(refused otherwise: it would put older data over newer).")
@click.option("--dry-run", is_flag=True, help="Only say what would be re-driven.")
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def dlq_redrive(sources: tuple[str, ...], account: str | None, reason: str | None, ids: tuple[str, ...],
                force: bool, dry_run: bool, as_json: bool) -> None:
    """Send entries back to where they failed; each is marked so it is not re-driven twice."""
    from heapsync.dlq import redrive
    from heapsync.replay import new_replay_id

    logs.setup("WARNING")
    settings, _ = _checked()
    entries, marks = _dlq_entries(sources, account, reason)
    if ids:
        entries = [e for e in entries if e.id in set(ids)]
    report = redrive(settings, entries, marks, replay_id=new_replay_id(), force=force, dry_run=dry_run)
    for warning in report.warnings:  # stderr, also with --json: a forced stale re-drive must not pass unnoticed
        click.echo(f"WARNING: {warning}", err=True)
    if as_json:
        _echo_json(report.as_json())
    else:
        from heapsync.ops_render import render_rows

        render_rows(f"re-drive {report.replay_id}{' (dry run)' if dry_run else ''}", report.outcomes,
                    ["entry", "reason", "outcome", "detail"])
        click.echo(f"produced: {report.produced['pages']} pages, {report.produced['deltas']} deltas; "
                   f"already re-driven, skipped: {report.skipped_done}")
    if any(o["outcome"] == "failed" for o in report.outcomes):
        sys.exit(2)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_broker_errors
def status(as_json: bool) -> None:
    """Consumer lag, open syncs, dead letters and the last applied sync per list."""
    from heapsync.status import gather

    logs.setup("WARNING")
    doc = gather(_checked()[0])
    if as_json:
        _echo_json(doc)
        return
    from heapsync.ops_render import render_status

    render_status(doc)


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write (default HEAPSYNC_ARCHIVE_DIR or .heapsync/archive).")
@click.option("--max-bytes", type=int, default=None, help="Rotate files at this size (HEAPSYNC_ARCHIVE_MAX_BYTES).")
@click.option("--max-seconds", type=float, default=None, help="Rotate files at this age (HEAPSYNC_ARCHIVE_MAX_SECONDS).")
def archive(directory: Path | None, max_bytes: int | None, max_seconds: float | None) -> None:
    """Archive every delta as JSON Lines files (its own consumer group, HEAPSYNC_ARCHIVE_GROUP)."""
    import asyncio

    from heapsync.kafka import ensure_topics
    from sinks.archive import build_runner

    settings, _ = _checked()
    if directory is not None:
        settings.archive_dir = directory
    if max_bytes is not None:
        settings.archive_max_bytes = max_bytes
    if max_seconds is not None:
        settings.archive_max_seconds = max_seconds
    logs.setup(settings.log_level)
    ensure_topics(settings)
    asyncio.run(build_runner(settings).run())  # the runner serves HEAPSYNC_METRICS_PORT


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
