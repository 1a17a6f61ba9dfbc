"""The published delta contract: the JSON Schema file in the repo is what the model says."""

from __future__ import annotations

import json

from heapsync.contracts import DELTA_SCHEMA_VERSION, Delta, delta_json_schema
from heapsync.schema import SCHEMA_PATH, render


def test_published_schema_file_matches_the_model() -> None:
    assert SCHEMA_PATH.name == f"delta.v{DELTA_SCHEMA_VERSION}.json"
    assert json.loads(SCHEMA_PATH.read_text()) == delta_json_schema(), (
        "heapsync/schemas/delta.v1.json is stale: run `.venv/bin/heapsync schema --write`")
    assert SCHEMA_PATH.read_text() == render()


def test_schema_names_the_fields_consumers_rely_on() -> None:
    schema = delta_json_schema()
    for name in ("schema_version", "delta_id", "account", "segment_id", "segment_name", "list_name",
                 "identity_field", "kind", "complete", "missing_pages", "chunk", "chunks", "add", "remove",
                 "replay_id"):
        assert name in schema["properties"], name
    assert schema["properties"]["kind"]["enum"] == ["sync", "drain"]


def test_a_delta_round_trips_through_json() -> None:
    d = Delta(delta_id="x", account="acme", segment_id="1", segment_name="A B", list_name="AB",
              identity_field="email", kind="sync", sync_task_id="s", chunk=2, chunks=3, add=["a"],
              remove=["b"], replay_id="r1")
    assert Delta.model_validate_json(d.model_dump_json()) == d
    assert d.chunk_key == "x:2@r1"
