"""Operator tables print what Heap sent as plain text (issue 16 #15): no markup, no links, no escape sequences."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import heapsync_ops.status
from heapsync_ops import cli, render
from heapsync_ops.render import plain, render_rows, render_status

LINK = "[link=https://evil.example/]click me[/link]"
ESCAPES = "\x1b[2J\x1b[31mred\x1b]0;pwned\x07\x1b]8;;https://evil.example/\x1b\\ink\x9b1m\x07\x00\x7f\u202eevil"


def status_doc(segment_name: str) -> dict[str, Any]:
    return {
        "at": 0.0, "lag": [], "lag_total": {},
        "open_syncs": [{"account": "acme", "segment_name": segment_name, "sync": "[bold]s1", "pages_received": 1,
                        "total_pages": 2, "age_seconds": 5}],
        "dead_letters": {"assembler": {"[/x] reason": 1}},
        "last_applied": [{"sink": "cordial", "account": "acme", "list_name": LINK, "sync_task_id": ":smile:",
                          "chunk": "1/1", "adds": 1, "removes": 0, "applied_at": "2026-12-01T00:00:00+00:00"}],
    }


def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What a real terminal would get: colours on, hyperlinks supported."""
    out = io.StringIO()
    monkeypatch.setattr(render, "_console", lambda: Console(file=out, force_terminal=True, width=300,
                                                                color_system="truecolor", soft_wrap=False))
    return out


def test_a_segment_named_like_closing_markup_does_not_crash_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heapsync_ops.status, "gather", lambda settings, accounts=None: status_doc("[/x]"))
    monkeypatch.setattr(cli, "_checked", lambda: (None, {}))
    res = CliRunner().invoke(cli.cli, ["status"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for literal in ("[/x]", "[bold]s1", "[/x] reason", ":smile:", "[link=https://evil.example/]click me[/link]"):
        assert literal in res.output, literal


def test_markup_is_shown_as_typed_and_never_becomes_a_link(monkeypatch: pytest.MonkeyPatch) -> None:
    out = terminal(monkeypatch)
    render_status(status_doc("[link=https://evil.example/]Segment[/link]"))
    text = out.getvalue()
    assert "\x1b]8;" not in text  # OSC 8, the terminal hyperlink
    assert "[link=https://evil.example/]Segment[/link]" in text and LINK in text


def test_escape_sequences_and_control_characters_never_reach_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    out = terminal(monkeypatch)
    render_rows("open syncs", [{"segment": ESCAPES, "sync": "a\nb\tc"}], ["segment", "sync"])
    text = out.getvalue()
    for bad in ("\x1b[2J", "\x1b[31m", "\x1b]0;", "\x1b]8;", "\x07", "\x00", "\x7f", "\x9b", "\u202e"):
        assert bad not in text, repr(bad)
    assert "redinkevil" in text and "a b c" in text  # the text itself stays readable
    piped = io.StringIO()
    Console(file=piped, force_terminal=False, width=300).print(render._text(ESCAPES))
    assert "\x1b" not in piped.getvalue()


def test_the_title_and_the_empty_line_are_plain_too(monkeypatch: pytest.MonkeyPatch) -> None:
    out = terminal(monkeypatch)
    render_rows("[/x] none here", [], ["a"])
    render_rows("[/y]", [{"a": 1}], ["a"])
    assert "[/x] none here: none" in out.getvalue() and "[/y]" in out.getvalue()


def test_plain_keeps_ordinary_text_as_it_is() -> None:
    for s in ("Heap Test Segment", "Kunden München", "顧客", "user+tag@example.com", "100%", "a [b] c"):
        assert plain(s) == s


@given(st.text())
def test_plain_leaves_no_control_character_and_no_escape(value: str) -> None:
    out = plain(value)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]", out)
    assert len(out) <= len(value)


def test_status_lists_what_the_removal_rail_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    out = terminal(monkeypatch)
    doc = {**status_doc("Seg"), "held": [{
        "delta_id": "d-held", "account": "acme", "list_name": "Churn", "reason": "drain held (hold_drains)",
        "waiting": 2, "held_at": "2026-12-01T00:00:00+00:00", "decision": None}]}
    render_status(doc)
    text = plain(out.getvalue())
    assert "held by the removal rail" in text and "d-held" in text and "drain held (hold_drains)" in text
    out.truncate(0)
    render_status(status_doc("Seg"))  # a document without the key (an older status) still renders
    assert "held by the removal rail (heapsync held list|show|release|discard): none" in plain(out.getvalue())
    out.truncate(0)
    replayed = {**doc["held"][0], "hold": "d-held@r7", "replay_id": "r7"}
    render_status({**status_doc("Seg"), "held": [replayed]})
    assert "d-held@r7" in plain(out.getvalue())  # a replayed copy is named so `heapsync held release` finds it
