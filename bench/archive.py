"""Archive sink writer: delta chunks per second with an fsync per chunk (what makes a committed
offset imply a durable line), against the ceiling of the same bytes appended without fsync."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from heapsync.contracts import Delta
from sinks.archive import ArchiveWriter

CHUNKS = 2000
IDS_PER_CHUNK = 100


def lines() -> list[bytes]:
    return [Delta(delta_id=f"d{i}", account="acme", segment_id="1", segment_name="Heap Test Segment",
                  list_name="HeapTestSegment", identity_field="email", kind="sync", sync_task_id=f"s{i}",
                  add=[f"user{i}-{j}@example.com" for j in range(IDS_PER_CHUNK)]).model_dump_json().encode()
            for i in range(CHUNKS)]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench archive",
                                     description="The archive writer against appending without fsync (no broker).")
    parser.parse_args(argv or [])
    data = lines()
    size = sum(len(x) + 1 for x in data)
    with tempfile.TemporaryDirectory() as tmp:
        ceiling_file = Path(tmp) / "ceiling.jsonl"
        t0 = time.perf_counter()
        with open(ceiling_file, "wb") as f:
            for line in data:
                f.write(line + b"\n")
                f.flush()
        ceiling = time.perf_counter() - t0
        writer = ArchiveWriter(Path(tmp) / "archive", max_bytes=64 * 1024 * 1024, max_seconds=3600)
        t0 = time.perf_counter()
        for line in data:
            writer.write(line)
        writer.close()
        measured = time.perf_counter() - t0
    print(f"  {CHUNKS} chunks of {IDS_PER_CHUNK} ids ({size / 1e6:.1f} MB)")
    print(f"  ceiling (append+flush, no fsync): {CHUNKS / ceiling:,.0f} chunks/s")
    print(f"  archive writer (fsync per chunk):  {CHUNKS / measured:,.0f} chunks/s "
          f"({size / measured / 1e6:.1f} MB/s), ratio {ceiling / measured:.3f} of the ceiling")
