"""Run every benchmark (or the ones named): ``python -m bench [ingest] [assembler] [sink] [archive] [replay]``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["ingest", "assembler", "sink", "archive", "replay"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                print(f"[bench] {name}: not written yet, skipped")
                continue
            raise
        print(f"[bench] {name}")
        module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
