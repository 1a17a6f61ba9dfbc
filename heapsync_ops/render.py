"""Terminal rendering for the operations commands (rich tables; plain text when piped).

rich is used for both the tables and the replay progress bar: one library, it
degrades to plain text when output is not a terminal, and it writes the bar to
stderr so stdout stays clean for scripts.

Cells hold what Heap sent (segment names, sync ids) and what others wrote on our topics,
so every string is printed as plain text, never read as rich markup (a segment named
``[/x]`` would crash the command, ``[link=...]`` would become a link), and control
characters and terminal escape sequences are taken out before they reach the terminal.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\|$)"  # OSC: window titles, hyperlinks, clipboard writes
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\|$)"  # DCS, SOS, PM, APC strings
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
    r"|\x1b[ -/]*[0-~]?"  # any other escape
)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Direction overrides: they reorder what the terminal shows after them."""


def plain(value: object) -> str:
    """``value`` as one line of printable text: escape sequences and control characters out, line breaks as spaces."""
    text = _ESCAPE_SEQUENCE.sub("", str(value))
    if text.isprintable():
        return text
    return "".join(" " if ch in "\t\n\r\v\f" else "" if unicodedata.category(ch) == "Cc" or ch in _BIDI else ch
                   for ch in text)


def _text(value: object) -> Text:
    """Plain text for rich: a ``Text`` is never parsed for markup or emoji codes."""
    return Text(plain(value))


def _console() -> Console:
    # a terminal gets its own width; piped output gets wide lines rather than cut-off ids
    probe = Console()
    return Console(soft_wrap=False, width=None if probe.is_terminal else 220, highlight=False)


def _say(line: str) -> None:
    _console().print(_text(line))


def render_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    console = _console()
    if not rows:
        console.print(_text(f"{title}: none"))
        return
    table = Table(title=_text(title), title_justify="left")
    for c in columns:
        table.add_column(_text(c))
    for r in rows:
        table.add_row(*(_text("" if r.get(c) is None else r.get(c)) for c in columns))
    console.print(table)


def render_replay(report: Any) -> None:
    rows = [{"account": a, "segment": s, "sync": y, "records": n} for (a, s, y), n in sorted(report.groups.items())]
    verb = "would replay" if report.dry_run else "replayed"
    render_rows(f"{report.kind}: {verb} {report.selected} records (replay id {report.replay_id})", rows,
                ["account", "segment", "sync", "records"])
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none"
    _say(f"read {report.read}, produced {report.produced}, skipped {skipped}")
    incomplete = report.incomplete()
    if incomplete:
        render_rows("WARNING: syncs only partly in the range (move --since earlier)", incomplete,
                    ["account", "segment", "sync", "pages", "total_pages"])


def render_status(doc: dict[str, Any]) -> None:
    render_rows("consumer lag", doc["lag"], ["group", "topic", "partition", "committed", "end", "lag"])
    totals = ", ".join(f"{g}: {n}" for g, n in doc["lag_total"].items()) or "none"
    _say(f"total lag: {totals}")
    for group, why in sorted(doc.get("lag_unknown", {}).items()):
        _say(f"lag of {group} unknown: its committed offsets could not be read ({why})")
    render_rows("open syncs", doc["open_syncs"],
                ["account", "segment_name", "sync", "pages_received", "total_pages", "age_seconds"])
    dl = [{"topic": src, "reason": reason, "count": n}
          for src, reasons in sorted(doc["dead_letters"].items()) for reason, n in sorted(reasons.items())]
    render_rows("dead letters (not re-driven)", dl, ["topic", "reason", "count"])
    render_rows("last applied per list", doc["last_applied"],
                ["sink", "account", "list_name", "sync_task_id", "chunk", "adds", "removes", "applied_at"])
    holds = [{"hold": r.get("delta_id"), **r} for r in doc.get("held", [])]  # hold: DELTA_ID[@REPLAY_ID]
    render_rows("held by the removal rail (heapsync held list|show|release|discard)", holds,
                ["hold", "account", "list_name", "reason", "waiting", "held_at", "decision"])
    if doc.get("disabled_segments"):
        render_rows("disabled segments (enabled = false: nothing sent to Cordial; pages kept in the pages topic)",
                    doc["disabled_segments"], ["account", "segment_id", "list_name", "syncs_skipped", "last_skipped_at"])


def render_topics(rows: list[dict[str, Any]]) -> None:
    render_rows("topics", rows, ["topic", "partitions", "replication", "retention", "cleanup_policy", "state"])


TRACE_COLUMNS = ["emitted_at", "sync_task_id", "replay_id", "chunk", "change", "contact", "outcome", "at", "detail"]


def render_trace(doc: dict[str, Any]) -> None:
    """One table per list, in the order the sink applies its changes, then what that leaves."""
    if not doc["lists"]:
        _say(f"{doc['contact']}: no change on the deltas topic (within its retention) for sink {doc['sink']}")
        return
    for lst in doc["lists"]:
        rows = [{**r, "sync_task_id": r["sync_task_id"] or "-"} for r in lst["steps"]]
        render_rows(f"{lst['account']} / {lst['list_name']}: {doc['contact']} (sink {doc['sink']})", rows,
                    TRACE_COLUMNS)
        if len(lst.get("partitions") or []) > 1:
            _say(f"WARNING: this list's changes are on partitions {lst['partitions']}: a sink applies each partition "
                 "in order, but not the partitions against each other (shown by the time each reached the topic)")
        member = {True: "a member", False: "not a member", None: "unknown (nothing applied yet)"}[lst["member"]]
        _say(f"after the last applied change: {member}")
