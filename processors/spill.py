"""A large sync's net change from its stored pages, in bounded memory: occurrences spilled to files.

Why: a sync's net change used to be one dict of all its ids (``rules.net_of_ordered``) plus
the lists of its chunks, over a gigabyte for ten million users. Here the pages are read once
and each id occurrence is written to the scratch file of its slot (a stable hash of the id,
``rules.page_entries``); then slots are read back in buckets of at most ``max_ids``
occurrences, each bucket's net computed on its own (``rules.bucket_net``) and written, in
position order, to a run file; the delta's ids are finally the runs merged by position
(``rules.merge_runs``), read a block at a time. The result is ``net_of_ordered``'s, in its
order (``rules.streamed_net`` is the same algorithm over plain data; a property test holds
them equal).

The files are scratch, not state: they can always be made again from the stored pages, and a
worker removes what a crash left behind when it starts (``clear_scratch``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

from processors import rules

MIN_ENTRY_BYTES = 4
"""The fewest bytes an id takes in a stored page (``"x",``): pages of N bytes hold at most N/4 ids."""
MAX_SLOTS = 256
"""Most scratch files written at once (one per slot)."""
RUN_BLOCK = 4096
"""Most ids per line of a run file: what one run holds in memory while the runs are merged (fewer
when there are many runs, so that all runs' blocks together stay within ``max_ids``)."""
_BUFFER = 64 * 1024
_SLOT_BUFFER = 8 * 1024
"""Write buffer of each slot file: up to ``MAX_SLOTS`` are open at once."""
SCATTER_PAGES = 50
"""Pages written to the slot files between two yields of ``prepare`` (a 10M-id sync is up to
100,000 pages: written in one go they blocked the worker's event loop for tens of seconds)."""


def slots_for(stored_bytes: int, max_ids: int) -> int:
    """Slots for a sync of ``stored_bytes`` of pages so no slot can hold more than ``max_ids``
    occurrences (up to ``MAX_SLOTS``); 1 means the whole sync fits in memory as it is."""
    return max(1, min(MAX_SLOTS, -(-stored_bytes // (MIN_ENTRY_BYTES * max(1, max_ids)))))


def clear_scratch(scratch_dir: Path) -> None:
    """Remove the scratch files of emissions a crash interrupted (nothing reads them again)."""
    shutil.rmtree(scratch_dir, ignore_errors=True)


class SpilledNet:
    """The net change of pages given in page order, as counts and streams of ids.

    Made with nothing read yet; ``prepare`` reads the pages into slot files (pass 1, a yield
    every ``scatter_pages`` pages) and then computes the buckets one at a time (a yield after
    each), so that the worker's event loop can run in between (heartbeats, acknowledgements).
    ``removes``/``adds`` are known once prepared (the chunk count needs them before the first
    chunk); ``remove_ids()``/``add_ids()`` stream the ids, merged from the run files. ``close`` removes the files.
    """

    def __init__(self, pages: Iterable[tuple[int, rules.PageChanges]], *, slots: int, max_ids: int,
                 scratch_dir: Path | None = None, scatter_pages: int = SCATTER_PAGES) -> None:
        if scratch_dir is not None:
            scratch_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="emit-", dir=scratch_dir))
        self.removes = self.adds = 0
        self._remove_runs: list[Path] = []
        self._add_runs: list[Path] = []
        self._max_ids = max_ids
        self._scattering: Iterator[None] | None = self._scatter(pages, slots, max(1, scatter_pages))
        self._groups: list[list[int]] = []
        self._block = RUN_BLOCK
        self._reduced = 0

    def prepare(self) -> Iterator[None]:
        """Pass 1 then pass 2, a few pages or a bucket at a time (a yield after each; resumes where
        it stopped)."""
        try:
            if self._scattering is not None:
                yield from self._scattering
                self._scattering = None
            while self._reduced < len(self._groups):
                self._reduce(self._reduced, self._groups[self._reduced])
                self._reduced += 1
                yield None
        except BaseException:
            self.close()
            raise

    def _slot_file(self, slot: int) -> Path:
        return self.dir / f"slot-{slot}"

    def _scatter(self, pages: Iterable[tuple[int, rules.PageChanges]], slots: int,
                 every: int) -> Iterator[None]:
        """Pass 1: every occurrence to its slot's file, one line per page and slot (a yield every
        ``every`` pages); then the buckets of pass 2 are known."""
        files: dict[int, IO[bytes]] = {}
        counts = [0] * slots
        dumps = orjson.dumps
        try:
            for n, (number, changes) in enumerate(pages, start=1):
                for slot, entry in rules.page_entries(number, changes, slots).items():
                    out = files.get(slot)
                    if out is None:
                        out = files[slot] = open(self._slot_file(slot), "wb", buffering=_SLOT_BUFFER)
                    out.write(dumps(entry))
                    out.write(b"\n")
                    counts[slot] += len(entry[0])
                if n % every == 0:
                    yield None
        finally:
            for out in files.values():
                out.close()
        self._groups = rules.group_slots(counts, self._max_ids)
        self._block = max(16, min(RUN_BLOCK, self._max_ids // max(1, len(self._groups))))

    def _reduce(self, n: int, group: list[int]) -> None:
        """Pass 2: one bucket's net, written as a removes run and an adds run (position order)."""

        def entries() -> Iterator[tuple[list[str], list[int]]]:
            for slot in group:
                with open(self._slot_file(slot), "rb", buffering=_BUFFER) as f:
                    for line in f:
                        ids, poss = orjson.loads(line)
                        yield ids, poss

        removes, adds = rules.bucket_net(entries())
        for slot in group:
            self._slot_file(slot).unlink()
        self.removes += len(removes)
        self.adds += len(adds)
        self._remove_runs.append(self._write_run(f"run-{n}-remove", removes))
        del removes
        self._add_runs.append(self._write_run(f"run-{n}-add", adds))

    def _write_run(self, name: str, run: list[tuple[int, str]]) -> Path:
        path = self.dir / name
        with open(path, "wb", buffering=_BUFFER) as out:
            for start in range(0, len(run), self._block):
                block = run[start:start + self._block]
                out.write(orjson.dumps([[p for p, _ in block], [i for _, i in block]]))
                out.write(b"\n")
        return path

    @staticmethod
    def _read_run(path: Path) -> Iterator[tuple[int, str]]:
        with open(path, "rb", buffering=_BUFFER) as f:
            for line in f:
                poss, ids = orjson.loads(line)
                yield from zip(poss, ids)

    def remove_ids(self) -> Iterator[str]:
        """Pass 3: the net removes in ``net_of_ordered``'s order."""
        for _ in self.prepare():
            pass
        return rules.merge_runs(self._read_run(p) for p in self._remove_runs)

    def add_ids(self) -> Iterator[str]:
        return rules.merge_runs(self._read_run(p) for p in self._add_runs)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
