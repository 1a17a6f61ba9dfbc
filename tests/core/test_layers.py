"""The layers stay visible: dev tooling -> operator tools -> stages -> core, and the stages apart.

The contract is in pyproject.toml (``[tool.importlinter]``); this runs the same check as
``make lint`` so a wrong-way import fails the suite too, naming the import chain.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_point_one_way_only() -> None:
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert tool, "import-linter is a dev dependency (pip install -e '.[dev]')"
    run = subprocess.run([tool, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_the_core_imports_no_stage_even_lazily() -> None:
    """import-linter sees imports inside functions too; this says it in plain words for the core."""
    outside = ("heapsync_ops", "heapsync_dev", "ingest", "processors", "sinks")
    for path in (ROOT / "heapsync").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                assert words[1].split(".")[0] not in outside, f"{path.relative_to(ROOT)}: {line.strip()}"
