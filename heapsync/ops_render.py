"""Terminal rendering for the operations commands (rich tables; plain text when piped).

rich is used for both the tables and the replay progress bar: one library, it
degrades to plain text when output is not a terminal, and it writes the bar to
stderr so stdout stays clean for scripts.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    # a terminal gets its own width; piped output gets wide lines rather than cut-off ids
    probe = Console()
    return Console(soft_wrap=False, width=None if probe.is_terminal else 220)


def render_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    console = _console()
    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    console.print(table)


def render_replay(report: Any) -> None:
    rows = [{"account": a, "segment": s, "sync": y, "records": n} for (a, s, y), n in sorted(report.groups.items())]
    verb = "would replay" if report.dry_run else "replayed"
    render_rows(f"{report.kind}: {verb} {report.selected} records (replay id {report.replay_id})", rows,
                ["account", "segment", "sync", "records"])
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none"
    _console().print(f"read {report.read}, produced {report.produced}, skipped {skipped}")
    incomplete = report.incomplete()
    if incomplete:
        render_rows("WARNING: syncs only partly in the range (move --since earlier)", incomplete,
                    ["account", "segment", "sync", "pages", "total_pages"])


def render_status(doc: dict[str, Any]) -> None:
    render_rows("consumer lag", doc["lag"], ["group", "topic", "partition", "committed", "end", "lag"])
    totals = ", ".join(f"{g}: {n}" for g, n in doc["lag_total"].items()) or "none"
    _console().print(f"total lag: {totals}")
    for group, why in sorted(doc.get("lag_unknown", {}).items()):
        _console().print(f"lag of {group} unknown: its committed offsets could not be read ({why})")
    render_rows("open syncs", doc["open_syncs"],
                ["account", "segment_name", "sync", "pages_received", "total_pages", "age_seconds"])
    dl = [{"topic": src, "reason": reason, "count": n}
          for src, reasons in sorted(doc["dead_letters"].items()) for reason, n in sorted(reasons.items())]
    render_rows("dead letters (not re-driven)", dl, ["topic", "reason", "count"])
    render_rows("last applied per list", doc["last_applied"],
                ["sink", "account", "list_name", "sync_task_id", "chunk", "adds", "removes", "applied_at"])


def render_topics(rows: list[dict[str, Any]]) -> None:
    render_rows("topics", rows, ["topic", "partitions", "replication", "retention", "cleanup_policy", "state"])
