"""The ``heapsync`` command line. Each stage runs alone (``ingest``, ``process``,
``sink``) so it can be scaled on its own; ``dev`` runs them all on one machine."""

from __future__ import annotations

import json
import logging
import os
import sys
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


class HeapsyncGroup(click.Group):
    """The command group, plus commands other installed packages register (entry point group ``heapsync.commands``).

    Loaded when the command line is used, not when this module is imported: the dev tooling
    (:mod:`heapsync_dev.commands`) sits above this layer and imports it.
    """

    def _plugins(self) -> dict[str, click.Command]:
        if not hasattr(self, "_loaded"):
            from importlib.metadata import entry_points

            self._loaded: dict[str, click.Command] = {}
            for point in entry_points(group=PLUGIN_GROUP):
                try:
                    self._loaded[point.name] = point.load()
                except ImportError:  # the package was left out of this install (e.g. the production image)
                    continue
        return self._loaded

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self._plugins().get(cmd_name)


PLUGIN_GROUP = "heapsync.commands"


@click.group(cls=HeapsyncGroup)
@click.version_option(package_name="heapsync")
def cli() -> None:
    """heapsync: keep Cordial lists in sync with Heap segments."""


@cli.command()
@click.option("--port", type=int, default=None, help="Port to listen on (default HEAPSYNC_INGEST_PORT or 8080).")
@click.option("--host", default=None, help="Address to bind (default HEAPSYNC_INGEST_HOST or 127.0.0.1).")
def ingest(port: int | None, host: str | None) -> None:
    """Serve Heap's webhook and write accepted pages to Kafka."""
    import functools

    from heapsync_ops.status_page import add_status_routes
    from ingest import server

    settings, accounts = _checked(require_accounts=True)
    if port is not None:
        settings.ingest_port = port
    if host is not None:
        settings.ingest_host = host
    logs.setup(settings.log_level)
    # the status page names the segments the accounts file turns off
    server.run(settings, accounts, admin=[functools.partial(add_status_routes, accounts=accounts)])


@cli.command()
def process() -> None:
    """Run a Faust worker that assembles pages into deltas (run several for more partitions)."""
    import faust
    from confluent_kafka import KafkaException

    from processors.worker import create_app, declare_changelogs

    settings, accounts = _checked()  # the segments' settings: pinned list names, disabled segments
    logs.setup(settings.log_level)
    app = create_app(settings, accounts)
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
    from heapsync_ops.topics_admin import describe

    settings, _ = _checked()
    logs.setup("WARNING")
    rows = describe(settings, create=create)
    if as_json:
        _echo_json(rows)
        return
    from heapsync_ops.render import render_topics

    render_topics(rows)


# --------------------------------------------------------------------------
# Operations: replay, dead letters, status, archive (see docs/operations.md "Runbooks")
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
    from heapsync_ops.replay import Filter, ReplayError, parse_since, run_replay

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
    from heapsync_ops.render import render_replay

    render_replay(report)


@cli.group()
def dlq() -> None:
    """Dead letters: list, show and re-drive them (rejected requests, assembler, sink)."""


_dlq_topic = click.option("--topic", "sources", multiple=True, type=click.Choice(["rejected", "assembler", "sink"]),
                          help="Which dead-letter topic (repeatable; default all three).")
_dlq_account = click.option("--account", default=None, help="Only entries of this account.")
_dlq_reason = click.option("--reason", default=None, help="Only entries whose reason contains this text.")


def _dlq_entries(sources: tuple[str, ...], account: str | None, reason: str | None) -> tuple[list, dict]:
    from heapsync_ops import dlq as dlq_mod

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
    from heapsync_ops.dlq import state_of

    logs.setup("WARNING")
    entries, marks = _dlq_entries(sources, account, reason)
    rows = [{"id": e.id, "at": e.at.isoformat(timespec="seconds"), "account": e.account, "reason": e.reason,
             "summary": e.summary, "state": state_of(e, marks)} for e in entries]
    rows = [r for r in rows if show_all or r["state"] != "redriven"]
    if as_json:
        _echo_json(rows)
        return
    from heapsync_ops.render import render_rows

    render_rows("dead letters", rows, ["id", "at", "account", "reason", "summary", "state"])


@dlq.command("show")
@click.argument("entry_id")
@_broker_errors
def dlq_show(entry_id: str) -> None:
    """Print one entry in full (ENTRY_ID as in `dlq list`, e.g. sink:0:12). It may hold user ids."""
    from heapsync_ops.dlq import state_of

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
    from heapsync_ops.dlq import redrive
    from heapsync_ops.replay import new_replay_id

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
        from heapsync_ops.render import render_rows

        render_rows(f"re-drive {report.replay_id}{' (dry run)' if dry_run else ''}", report.outcomes,
                    ["entry", "reason", "outcome", "detail"])
        click.echo(f"produced: {report.produced['pages']} pages, {report.produced['deltas']} deltas; "
                   f"already re-driven, skipped: {report.skipped_done}")
    if any(o["outcome"] == "failed" for o in report.outcomes):
        sys.exit(2)


@cli.group()
def held() -> None:
    """Deltas the removal rail holds (max_removal_fraction, hold_drains): list, show, release, discard."""


_held_sink = click.option("--sink", default="cordial", show_default=True, help="The sink whose holds these are.")


def _held_error(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@held.command("list")
@_held_sink
@click.option("--account", default=None, help="Only this account.")
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def held_list(sink: str, account: str | None, as_json: bool) -> None:
    """Every held delta, oldest first per list, with how many deltas wait behind it."""
    from heapsync_ops.held import load_state

    logs.setup("WARNING")
    rows = [r for r in load_state(_checked()[0], sink).holds() if account is None or r["account"] == account]
    if as_json:
        _echo_json(rows)
        return
    from heapsync.ops_render import render_rows

    render_rows("held deltas", rows, ["hold", "account", "list_name", "kind", "reason", "waiting", "held_at",
                                      "decision"])


@held.command("show")
@click.argument("delta_id", metavar="DELTA_ID[@REPLAY_ID]")
@_held_sink
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def held_show(delta_id: str, sink: str, as_json: bool) -> None:
    """One held delta: why, its size, and the deltas waiting behind it (no contact ids)."""
    from heapsync_ops.held import HoldError, find, load_state

    logs.setup("WARNING")
    try:
        row = find(load_state(_checked()[0], sink), delta_id)
    except HoldError as exc:
        raise _held_error(exc) from None
    if as_json:
        _echo_json(row)
        return
    from heapsync.ops_render import render_rows

    for name in ("hold", "account", "list_name", "segment_id", "kind", "sync_task_id", "reason", "members",
                 "removes", "adds", "chunks_held", "chunks", "held_at", "decision"):
        click.echo(f"{name:>14}: {row[name]}")
    render_rows("waiting behind it, in order", row["waiting_detail"],
                ["hold", "kind", "sync_task_id", "chunks", "adds", "removes"])


def _decide(delta_id: str, sink: str, as_json: bool, action: str) -> None:
    from heapsync_ops.held import HoldError, decide

    logs.setup("WARNING")
    try:
        result = decide(_checked()[0], delta_id, action, sink)
    except HoldError as exc:
        raise _held_error(exc) from None
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"{action}d: {result['outcome']}")


@held.command("release")
@click.argument("delta_id", metavar="DELTA_ID[@REPLAY_ID]")
@_held_sink
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def held_release(delta_id: str, sink: str, as_json: bool) -> None:
    """Apply a held delta after all, then the deltas waiting behind it, in order."""
    _decide(delta_id, sink, as_json, "release")


@held.command("discard")
@click.argument("delta_id", metavar="DELTA_ID[@REPLAY_ID]")
@_held_sink
@click.option("--json", "as_json", is_flag=True)
@_broker_errors
def held_discard(delta_id: str, sink: str, as_json: bool) -> None:
    """Drop a held delta (never applied); the deltas waiting behind it are then applied in order."""
    _decide(delta_id, sink, as_json, "discard")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_broker_errors
def status(as_json: bool) -> None:
    """Consumer lag, open syncs, dead letters, the last applied sync per list, disabled segments."""
    from heapsync_ops.status import gather

    logs.setup("WARNING")
    doc = gather(*_checked())  # the accounts name the disabled segments
    if as_json:
        _echo_json(doc)
        return
    from heapsync_ops.render import render_status

    render_status(doc)


@cli.command()
@click.argument("contact_id")
@click.option("--account", default=None, help="Only lists of this account.")
@click.option("--list", "list_name", default=None, metavar="LIST", help="Only this list (Cordial list name or segment id).")
@click.option("--sink", default="cordial", show_default=True, help="Whose progress decides 'applied'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_broker_errors
def trace(contact_id: str, account: str | None, list_name: str | None, sink: str, as_json: bool) -> None:
    """Why is this contact (not) in the list: every change of it on the deltas topic, per list, in order,
    and what became of each (applied, repeat, held, dead-lettered, re-driven). CONTACT_ID `-` reads it
    from stdin (so it stays out of the process list). Prints only this contact's entries."""
    from heapsync_ops.trace import Filter, gather

    if contact_id == "-":
        contact_id = sys.stdin.readline().strip()
    if not contact_id.strip():
        raise click.BadParameter("give the contact id (an email, or the account's identity key value)",
                                 param_hint="CONTACT_ID")
    settings, _ = _checked()
    logs.setup("WARNING")
    result = gather(settings, contact_id, sink=sink, flt=Filter(account, list_name))
    if as_json:
        _echo_json(result.as_json())
        return
    from heapsync_ops.render import render_trace

    render_trace(result.as_json())


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
