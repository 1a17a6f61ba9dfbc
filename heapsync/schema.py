"""The delta contract as JSON Schema, published in the repo for other consumers."""

from __future__ import annotations

import json
from pathlib import Path

from heapsync.contracts import DELTA_SCHEMA_VERSION, delta_json_schema

SCHEMA_PATH = Path(__file__).parent / "schemas" / f"delta.v{DELTA_SCHEMA_VERSION}.json"


def render() -> str:
    return json.dumps(delta_json_schema(), indent=2, sort_keys=True) + "\n"
