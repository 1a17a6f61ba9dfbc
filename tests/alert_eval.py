"""Helpers for checking alert expressions against scraped samples (tests/test_alerts*.py).

Two ways, so the check runs everywhere: a tiny evaluator for the rule shape the scraped-value
checks use (``<max|sum> by (labels) (metric) > N``), and ``promtool`` with the samples as input
series (the real PromQL engine), when promtool is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

Sample = tuple[str, dict[str, str], float]


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def promtool() -> str | None:
    """promtool's path; None outside CI when it is not installed (CI=true: missing promtool fails)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is required in CI (Debian package `prometheus`; .ci/run installs it)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def parse(text: str) -> list[Sample]:
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


_SHAPE = re.compile(r"^(max|sum) by \(([^)]*)\) \((\w+)\) > (\d+(?:\.\d+)?)$")


def evaluate(expr: str, samples: list[Sample]) -> dict[tuple[tuple[str, str], ...], float]:
    """The result of ``expr`` (only ``<max|sum> by (labels) (metric) > N``): labels of each true group -> value."""
    m = _SHAPE.match(expr.strip())
    assert m, f"the tiny evaluator does not handle {expr!r}"
    agg, by, metric, threshold = m.group(1), [x.strip() for x in m.group(2).split(",")], m.group(3), float(m.group(4))
    groups: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for name, labels, value in samples:
        if name == metric:
            groups.setdefault(tuple((k, labels.get(k, "")) for k in by), []).append(value)
    out = {}
    for key, values in groups.items():
        v = max(values) if agg == "max" else sum(values)
        if v > threshold:
            out[key] = v
    return out


def promtool_agrees(tool: str, tmp: Path, alert: str, samples: list[Sample],
                    expected: dict[tuple[tuple[str, str], ...], float]) -> None:
    """promtool, with ``samples`` held for 3 h as input series, evaluates the alert's expression to exactly
    ``expected`` (label set -> value): the real PromQL engine agrees with the tiny evaluator."""
    expr = rules()[alert]["expr"]
    wanted = set(re.findall(r"heapsync_[a-z_]+", expr))
    series = [{"series": _selector(name, labels), "values": f"{value!r}x200"}
              for name, labels, value in samples if name in wanted]
    assert series, f"no scraped sample for {alert}"
    (tmp / "alerts.yml").write_text(ALERTS.read_text())
    test = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [{"expr": expr, "eval_time": "150m", "exp_samples": [
            {"labels": _selector("", dict(key)), "value": value} for key, value in expected.items()]}],
    }]}
    path = tmp / f"scraped_{alert}_test.yml"
    path.write_text(yaml.safe_dump(test))
    run = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def promtool_fires_once(tool: str, tmp: Path, alert: str, series: list[dict[str, str]], eval_time: str) -> None:
    """promtool evaluates the alert's expression over ``series`` (promtool's input notation) at ``eval_time``
    to exactly one true result: for expressions whose value is not exact (``increase`` extrapolates)."""
    expr = rules()[alert]["expr"]
    (tmp / "alerts.yml").write_text(ALERTS.read_text())
    test = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [{"expr": f"count({expr})", "eval_time": eval_time,
                              "exp_samples": [{"labels": "{}", "value": 1}]}],
    }]}
    path = tmp / f"series_{alert}_test.yml"
    path.write_text(yaml.safe_dump(test))
    run = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def selector(name: str, labels: dict[str, str]) -> str:
    return _selector(name, labels)


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
