"""Issue 13 #3: the alerting rules (deploy/prometheus/alerts.yml) and the metrics they read.

The rules are tested with ``promtool test rules tests/alerts_test.yml`` (skipped only when promtool
is missing outside CI); the new gauges' rules are pure functions tested directly here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client import generate_latest

import heapsync_ops.metrics as ops_metrics
from heapsync import lag
from heapsync.contracts import AnyDeadLetter, AppliedChunk, DeadLetterSource, RedriveMark, read_dead_letter
from heapsync_ops.metrics import OpsView
from processors import metrics as processor_metrics
from processors.assembler import Assembler
from sinks.offsets import PartitionProgress
from tests.alert_eval import ALERTS, ROOT, evaluate, parse, promtool, promtool_agrees, rules
from tests.deploy.test_dashboard_metrics import exported_names
from tests.processors.test_assembler import ACCOUNT, page

RUNBOOKS = "docs/operations.md"
OPS_PAGE = (ROOT / RUNBOOKS).read_text()  # the operations page: alerts, their series and runbooks
RULE_TESTS = yaml.safe_load((ROOT / "tests" / "alerts_test.yml").read_text())


# -- the rules ----------------------------------------------------------------------


def test_rules_pass_promtools_checks_and_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([tool, "test", "rules", str(ROOT / "tests" / "alerts_test.yml")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, list[bool]] = {}
    for test in RULE_TESTS["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for name in rules():
        assert True in cases.get(name, []) and False in cases.get(name, []), name


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def test_every_alert_links_to_its_runbook_in_the_docs() -> None:
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", OPS_PAGE, re.M)}
    for name, rule in rules().items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOKS}#alert-{name.lower()}", name
        assert url.split("#", 1)[1] in headings, f"{RUNBOOKS} has no runbook heading for {name}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_every_series_the_rules_read_is_exported_and_documented() -> None:
    used = {m for rule in rules().values() for m in re.findall(r"heapsync_[a-z_]+", rule["expr"])}
    assert used
    assert sorted(used - exported_names()) == []
    for name in used:
        assert name.removesuffix("_total") in OPS_PAGE, f"{name} not documented"


def test_default_thresholds_fit_heaps_four_hour_cadence() -> None:
    r = rules()
    assert "> 9 * 3600" in r["HeapsyncListNotApplied"]["expr"]  # two missed syncs and an hour
    assert r["HeapsyncConsumerNotCatchingUp"]["for"] == "2h"  # a burst drains well within a sync interval
    assert "> 5400" in r["HeapsyncOpenSyncTooOld"]["expr"]  # above the default sync timeout (3600 s)


def test_the_tiny_evaluator_agrees_with_promtool(tmp_path: Path) -> None:
    samples = parse('heapsync_sink_account_paused{account="a"} 1\nheapsync_sink_account_paused{account="b"} 0\n'
                    'heapsync_dead_letters_pending{source="sink",reason="x"} 2\n'
                    'heapsync_dead_letters_pending{source="rejected",reason="y"} 0\n')
    paused = evaluate(rules()["HeapsyncAccountPaused"]["expr"], samples)
    pending = evaluate(rules()["HeapsyncDeadLettersPending"]["expr"], samples)
    assert paused == {(("account", "a"),): 1.0}
    assert pending == {(("source", "sink"), ("reason", "x")): 2.0}
    tool = promtool()
    promtool_agrees(tool, tmp_path, "HeapsyncAccountPaused", samples, paused)
    promtool_agrees(tool, tmp_path, "HeapsyncDeadLettersPending", samples, pending)


# -- the gauges' rules ------------------------------------------------------------------


def applied(account: str, list_name: str, at: str, kind: str = "sync", sink: str = "cordial") -> AppliedChunk:
    return AppliedChunk.model_validate_json(orjson.dumps({
        "sink": sink, "chunk_key": "d:1", "delta_id": "d", "chunk": 1, "chunks": 1, "account": account,
        "list_name": list_name, "segment_id": "1", "sync_task_id": "s" if kind == "sync" else None, "kind": kind,
        "complete": True, "adds": 1, "removes": 0, "applied_at": at}))


def dead_letter(source: DeadLetterSource, doc: dict[str, Any]) -> AnyDeadLetter:
    return read_dead_letter(source, doc)


def test_last_applied_sync_per_list_moves_forward_only_and_a_drained_list_is_not_reported() -> None:
    view = OpsView()
    view.on_applied(applied("acme", "Churn", "2026-01-01T08:00:00+00:00"))
    view.on_applied(applied("acme", "Churn", "2026-01-01T04:00:00+00:00"))  # an older record read later
    view.on_applied(applied("acme", "VIP", "2026-01-01T04:00:00Z"))
    assert view.last_applied[("cordial", "acme", "Churn")] == 1767254400.0  # 08:00
    view.on_applied(applied("acme", "VIP", "2026-01-01T06:00:00Z", kind="drain"))
    assert ("cordial", "acme", "VIP") not in view.last_applied  # Heap sends no more syncs of a drained segment
    view.on_applied(applied("acme", "VIP", "2026-01-01T05:00:00Z"))  # older than the drain
    assert ("cordial", "acme", "VIP") not in view.last_applied
    view.on_applied(applied("acme", "VIP", "2026-01-02T00:00:00Z"))  # the segment came back
    assert ("cordial", "acme", "VIP") in view.last_applied


def test_a_discarded_delta_does_not_move_the_last_applied_time_of_its_list() -> None:
    """A held delta an operator discarded was never sent: its progress records (``discarded``) leave the
    gauge at the last sync that was applied, and a discarded drain does not drop the list from it."""
    view = OpsView()
    view.on_applied(applied("acme", "Churn", "2026-01-01T08:00:00+00:00"))
    view.on_applied(applied("acme", "Churn", "2026-01-01T09:00:00+00:00").model_copy(update={"discarded": True}))
    view.on_applied(applied("acme", "Churn", "2026-01-01T10:00:00+00:00", kind="drain").model_copy(
        update={"discarded": True}))
    assert view.last_applied[("cordial", "acme", "Churn")] == 1767254400.0  # still 08:00


def test_dead_letters_pending_until_redriven_counted_once_per_entry() -> None:
    view = OpsView()
    view.on_dead_letter("sink", "p.sink.dlq", 0, 5, dead_letter("sink", {"reason": "cordial rejected the operation"}))
    view.on_dead_letter("sink", "p.sink.dlq", 1, 9, dead_letter("sink", {"reason": "cordial rejected the operation"}))
    view.on_dead_letter("assembler", "p.deltas.dlq", 2, 0, dead_letter("assembler", {
        "reason": "sync timed out with pages missing", "split": {"group": "g", "part": 1, "parts": 2}}))
    view.on_dead_letter("assembler", "p.deltas.dlq", 2, 1, dead_letter("assembler", {
        "reason": "sync timed out with pages missing", "split": {"group": "g", "part": 2, "parts": 2}}))
    assert view.pending() == {("sink", "cordial rejected the operation"): 2,
                              ("assembler", "sync timed out with pages missing"): 1}
    view.on_mark(b"p.sink.dlq|0|5", RedriveMark(outcome="redriven"))
    view.on_mark(b"p.deltas.dlq|2|0", RedriveMark(outcome="failed"))  # tried and failed: still to do
    assert view.pending() == {("sink", "cordial rejected the operation"): 1,
                              ("assembler", "sync timed out with pages missing"): 1}
    view.on_mark(b"p.sink.dlq|1|9", RedriveMark(outcome="redriven"))
    assert view.pending()[("sink", "cordial rejected the operation")] == 0  # stays at 0: the alert resolves
    view.on_mark(b"p.sink.dlq|1|9", None)  # the mark deleted (tombstone): pending again
    assert view.pending()[("sink", "cordial rejected the operation")] == 1


def test_reasons_are_capped_in_length_and_number() -> None:
    view = OpsView()
    for i in range(ops_metrics.MAX_REASONS + 5):
        view.on_dead_letter("rejected", "p.pages.rejected", 0, i,
                            dead_letter("rejected", {"reason": f"reason {i} " + "x" * 500}))
    counts = view.pending()
    assert counts[("rejected", "other")] == 5
    assert len(counts) == ops_metrics.MAX_REASONS + 1
    assert all(len(reason) <= ops_metrics.MAX_REASON_CHARS for _, reason in counts)


def test_the_ingress_exports_the_view_it_attached() -> None:
    view = OpsView()
    view.on_applied(applied("acme", 'Say "hi"', "2026-01-01T08:00:00Z"))
    view.on_dead_letter("sink", "p.sink.dlq", 0, 1, dead_letter("sink", {"reason": "unknown account"}))
    before = (ops_metrics.COLLECTOR.view, ops_metrics.COLLECTOR.failures)
    try:
        ops_metrics.attach(view, lambda: 3)
        samples = parse(generate_latest().decode())
    finally:
        ops_metrics.COLLECTOR.view, ops_metrics.COLLECTOR.failures = before
    assert ("heapsync_list_last_applied_timestamp_seconds",
            {"sink": "cordial", "account": "acme", "list": 'Say "hi"'}, 1767254400.0) in samples
    assert ("heapsync_dead_letters_pending", {"source": "sink", "reason": "unknown account"}, 1.0) in samples
    assert ("heapsync_ingest_status_reader_failures", {}, 3.0) in samples


def test_partition_lag_counts_from_the_first_offset_not_done() -> None:
    assert lag.partition_lag(100, 40) == 60
    assert lag.partition_lag(100, None, low=10) == 90  # nothing committed: from the earliest record
    assert lag.partition_lag(100, -1001, low=10) == 90
    assert lag.partition_lag(100, 5, low=10) == 90  # committed offset below the retention
    assert lag.partition_lag(100, 120) == 0
    progress = PartitionProgress("t", 0)
    assert progress.done_up_to() is None
    entries = [progress.track(o) for o in (10, 11, 12)]
    entries[0].done = entries[2].done = True
    assert progress.done_up_to() == 11  # 12 is done but 11 is not: lag counts 11 and 12
    entries[1].done = True
    assert progress.done_up_to() == 13


def test_the_workers_newest_tick_is_not_lag_but_older_ticks_are() -> None:
    """A tick the leader just sent is committed up to Faust's commit interval later: not backlog."""
    assert lag.partition_lag(5, 4, newest_is_tick=True) == 0  # everything done but the newest tick
    assert lag.partition_lag(1, None, newest_is_tick=True) == 0  # right after start: only a tick, no commit yet
    assert lag.partition_lag(5, 3, newest_is_tick=True) == 1  # an older record (a page or a tick) still counts
    assert lag.partition_lag(5, 5, newest_is_tick=True) == 0  # never negative
    assert lag.partition_lag(5, 4) == 1


def test_lag_series_of_partitions_given_up_disappear() -> None:
    rows = [lag.Row("g-test", "t", 0, 5), lag.Row("g-test", "t", 1, 0)]
    series = lag.publish(rows, set())
    series = lag.publish(rows[1:], series)
    samples = [s for s in parse(generate_latest().decode()) if s[1].get("group") == "g-test"]
    assert samples == [("heapsync_consumer_lag", {"group": "g-test", "topic": "t", "partition": "1"}, 0.0)]
    lag.forget(series)


def test_oldest_open_sync_age_on_each_tick() -> None:
    maps: list[dict[str, Any]] = [{}, {}, {}, {}]
    asm = Assembler(*maps, timeout_seconds=3600)
    assert asm.on_tick(partition=0, now=50.0).oldest_open_seconds == 0.0
    asm.on_sync_page(ACCOUNT, page("s1", 1, 2, add=["a"], segment="1"), partition=0, now=100.0)
    asm.on_sync_page(ACCOUNT, page("s2", 1, 2, add=["b"], segment="1"), partition=0, now=200.0)  # queued behind s1
    asm.on_sync_page(ACCOUNT, page("s3", 1, 2, add=["c"], segment="2"), partition=0, now=300.0)
    step = asm.on_tick(partition=0, now=1000.0)
    assert (step.open_syncs, step.oldest_open_seconds) == (3, 900.0)
    assert asm.on_tick(partition=1, now=1000.0).oldest_open_seconds == 0.0  # other partitions' syncs not counted
    processor_metrics.set_open_syncs(0, step.open_syncs or 0, step.oldest_open_seconds)
    samples = parse(generate_latest().decode())
    assert ("heapsync_assembler_oldest_open_sync_seconds", {"partition": "0"}, 900.0) in samples
    processor_metrics.forget_partitions([0])
    assert not [s for s in parse(generate_latest().decode())
                if s[0] == "heapsync_assembler_oldest_open_sync_seconds" and s[1] == {"partition": "0"}]


def test_alert_rules_file_is_what_the_scrape_config_loads() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert [ALERTS.parent / f for f in config["rule_files"]] == [ALERTS]


def test_the_dashboard_charts_every_series_the_alerts_read() -> None:
    import json

    dash = json.loads((ROOT / "deploy" / "grafana" / "heapsync.json").read_text())
    charted = {m for p in dash["panels"] for t in p.get("targets", []) for m in re.findall(r"heapsync_[a-z_]+", t["expr"])}
    used = {m for rule in rules().values() for m in re.findall(r"heapsync_[a-z_]+", rule["expr"])}
    assert sorted(used - charted) == []
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(boxes) == len(set(boxes))  # no panel drawn over another


def test_ci_installs_promtool_before_the_tests() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    install = script.index("install -y -qq --no-install-recommends prometheus")
    assert script.index("command -v promtool") < install < script.index("make test")
