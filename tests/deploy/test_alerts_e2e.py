"""Issue 13 #3, end to end: the real ingress and sink are scraped while faults are injected (a
Cordial key revoked, an operation Cordial refuses), and the shipped alerts' expressions, evaluated
over the scraped values, turn true (a tiny evaluator always; promtool as well when installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from heapsync_dev.processes import free_port
from tests.alert_eval import Sample, evaluate, parse, promtool, promtool_agrees, promtool_fires_once, rules, selector
from tests.conftest import Pipeline, http
from tests.processors.test_crash import post_pages
from tests.sink_helpers import make_delta, produce, sim_members, wait_for

pytestmark = pytest.mark.integration


def scrape(url: str) -> list[Sample]:
    result = http("GET", url, timeout=10)
    assert result.status == 200, result.body
    return parse(result.body)


def test_revoked_key_and_refused_operation_make_their_alert_expressions_true(pipeline: Pipeline,
                                                                              tmp_path: Path) -> None:
    pipeline.start_simulator()
    pipeline.start_ingest()
    metrics_port = free_port()
    pipeline.start("sink", "sink", env=pipeline.env(HEAPSYNC_METRICS_PORT=str(metrics_port),
                                                    HEAPSYNC_SINK_AUTH_PROBE_SECONDS="0.5"))
    sink_url = f"http://127.0.0.1:{metrics_port}/metrics"
    ingress_url = f"http://127.0.0.1:{pipeline.admin_port}/metrics"
    alerts = rules()
    paused_expr = alerts["HeapsyncAccountPaused"]["expr"]
    pending_expr = alerts["HeapsyncDeadLettersPending"]["expr"]
    lag_expr = alerts["HeapsyncConsumerNotCatchingUp"]["expr"]

    good = [f"u{i}@example.com" for i in range(5)]
    produce(pipeline, make_delta("Churn risk", add=good))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Churn risk") == set(good)), pipeline.logs()
    assert wait_for(lambda: scrape(sink_url) and scrape(ingress_url) is not None), pipeline.logs()
    healthy = scrape(sink_url) + scrape(ingress_url)
    assert evaluate(paused_expr, healthy) == {}
    assert evaluate(pending_expr, healthy) == {}

    # fault 1: Cordial refuses one operation (invalid email) -> a sink dead letter nobody re-drove
    produce(pipeline, make_delta("Churn risk", add=["not-an-email"]))
    assert wait_for(lambda: evaluate(pending_expr, scrape(ingress_url)), 60), pipeline.logs()
    # fault 2: the account's key is revoked -> the sink pauses the account, its chunk waits in Kafka
    assert http("POST", f"{pipeline.sim_url}/_sim/config", b'{"revoke": ["acme"]}').status == 200
    produce(pipeline, make_delta("Churn risk", add=["late@example.com"]))

    last: list[list[Sample]] = [[]]

    def faulty() -> list[Sample] | None:
        samples = last[0] = scrape(sink_url) + scrape(ingress_url)
        if evaluate(paused_expr, samples) and evaluate(pending_expr, samples) and evaluate(lag_expr, samples):
            return samples
        return None

    assert wait_for(lambda: faulty() is not None, 120), (
        [s for s in last[0] if s[0].startswith(("heapsync_consumer", "heapsync_dead", "heapsync_sink_account"))],
        pipeline.logs())
    samples = faulty()
    assert samples is not None
    paused = evaluate(paused_expr, samples)
    pending = evaluate(pending_expr, samples)
    lagging = evaluate(lag_expr, samples)
    assert paused == {(("account", "acme"),): 1.0}
    assert pending == {(("source", "sink"), ("reason", "cordial rejected the operation")): 1.0}
    assert [dict(k)["group"] for k in lagging] == [f"{pipeline.prefix}-sink"]
    assert all(v >= 1 for v in lagging.values())
    # the list was applied moments ago: its staleness gauge is there, a recent epoch time
    applied = [s for s in samples if s[0] == "heapsync_list_last_applied_timestamp_seconds"]
    assert [(s[1]["account"], s[1]["list"]) for s in applied] == [("acme", "Churn risk")]
    # no user id or email in any label of what Prometheus scrapes
    assert not [s for s in samples if any("@" in v for v in s[1].values())]

    # the real PromQL engine agrees (skipped without promtool outside CI)
    tool = promtool()
    assert tool is not None
    promtool_agrees(tool, tmp_path, "HeapsyncAccountPaused", samples, paused)
    promtool_agrees(tool, tmp_path, "HeapsyncDeadLettersPending", samples, pending)
    promtool_agrees(tool, tmp_path, "HeapsyncConsumerNotCatchingUp", samples, lagging)


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [v for n, lbl, v in samples if n == name and all(lbl.get(k) == x for k, x in labels.items())]
    return max(found) if found else None


def test_a_sync_missing_a_page_shows_as_open_then_as_a_partial_delta_alert(pipeline: Pipeline,
                                                                           tmp_path: Path) -> None:
    metrics_port = free_port()
    pipeline.extra_env.update({"HEAPSYNC_SYNC_TIMEOUT_SECONDS": "15", "HEAPSYNC_METRICS_PORT": str(metrics_port)})
    pipeline.start_ingest()
    pipeline.start("process", "process")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    group = f"{pipeline.prefix}-assembler"

    def scraped() -> list[Sample]:
        try:
            return scrape(url)
        except OSError:
            return []  # the worker is not serving yet

    # the leader measures the group's lag on the pages topic, one series per partition
    assert wait_for(lambda: value(scraped(), "heapsync_consumer_lag", group=group) is not None, 120), pipeline.logs()
    assert {s[1]["partition"] for s in scraped() if s[0] == "heapsync_consumer_lag"} == {"0", "1", "2"}

    # page 2 of 2 never comes: the sync stays open (its age grows), then times out into a partial delta
    post_pages(pipeline, "lost-page-sync", [(["a@example.com"], []), (["b@example.com"], [])], [1])
    assert wait_for(lambda: (value(scraped(), "heapsync_assembler_oldest_open_sync_seconds") or 0) > 0, 60), \
        pipeline.logs()
    before = value(scraped(), "heapsync_assembler_partial_deltas_total")
    assert before == 0
    assert wait_for(lambda: value(scraped(), "heapsync_assembler_partial_deltas_total") == 1, 90), pipeline.logs()
    # nothing open any more, from the next tick on (the gauge is set on each tick)
    assert wait_for(lambda: value(scraped(), "heapsync_assembler_oldest_open_sync_seconds") == 0, 30), pipeline.logs()

    # HeapsyncPartialDelta over the two scrapes (the counter went 0 -> 1) is true, and an hour later not
    tool = promtool()
    assert tool is not None
    series = [{"series": selector("heapsync_assembler_partial_deltas_total", {"instance": "processor"}),
               "values": "0x30 1x120"}]
    promtool_fires_once(tool, tmp_path, "HeapsyncPartialDelta", series, "45m")
