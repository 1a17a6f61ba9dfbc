"""Disabled segments where an operator looks (``heapsync status``, the status page) and a misspelt segment key
stopping every command (issue 14, #2). The chain is in tests/chain/test_segments.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from heapsync.settings import disabled_segments
from heapsync.topic_reader import Record
from heapsync_ops.status import disabled_with_skips
from heapsync_ops.status_page import StatusBoard, render_html
from tests.core.test_segment_settings import BASE, accounts
from tests.ops.test_config_check import run_cli


def test_status_counts_syncs_skipped_for_each_disabled_segment() -> None:
    def rec(key: str, value: dict[str, Any] | None) -> Record:
        return Record(topic="t", partition=0, offset=0, key=orjson.dumps(key),
                      value=None if value is None else orjson.dumps(value), timestamp_ms=0)

    done = {r.key: r for r in [
        rec("acme|sync||s1", {"outcome": "disabled", "segment_id": "1", "at": 100.0}),
        rec("acme|drain||drain:r", {"outcome": "disabled", "segment_id": "1", "at": 200.0}),
        rec("acme|sync||s2", {"outcome": "delta", "at": 300.0}),
        rec("other|sync||s3", {"outcome": "disabled", "segment_id": "1", "at": 400.0}),
    ]}
    [row] = disabled_with_skips(disabled_segments(accounts('[accounts.acme.segments."1"]\nenabled = false\n')), done)
    assert row == {"account": "acme", "segment_id": "1", "list_name": None, "syncs_skipped": 2,
                   "last_skipped_at": "1970-01-01T00:03:20+00:00"}


def test_the_status_page_names_disabled_segments() -> None:
    html = render_html({**StatusBoard().snapshot(), "disabled_segments": [
        {"account": "acme", "segment_id": "15225086", "list_name": "Customers"}]})
    assert "Disabled segments" in html and "15225086" in html and "Customers" in html
    assert "Disabled segments" not in render_html(StatusBoard().snapshot())



@pytest.mark.parametrize("command", [["ingest"], ["process"], ["sink"], ["status"]])
def test_an_unknown_segment_key_stops_the_command_with_one_line_naming_it(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(BASE + '[accounts.acme.segments."15225086"]\nlist_name = "Customers"\nenabeld = false\n')
    result = run_cli(command, tmp_path, HEAPSYNC_ACCOUNTS_FILE=str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: {path}: accounts.acme: segments.15225086.enabeld: Extra inputs are not permitted"]
