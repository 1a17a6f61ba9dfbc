"""The worker's wiring (processors/worker.py): what Faust is handed, without a broker."""

from __future__ import annotations

from heapsync.settings import Settings
from processors.assembler import Assembler
from processors.worker import Worker, create_app


def _settings(**kw: object) -> Settings:
    return Settings(processor_store="memory://", processor_group="wiring", **kw)  # type: ignore[arg-type]


def test_create_app_hands_faust_the_pages_agent_the_tables_and_the_tick_timer() -> None:
    app = create_app(_settings(metrics_port=None))
    assert list(app.agents) == ["processors.worker.assemble"]  # the name the agent always had
    assert sorted(app.tables) == ["done", "done_days", "pages", "segments", "syncs"]
    assert [task.__name__ for task in app._app_tasks] == ["tick"]
    assert isinstance(app.assembler, Assembler)  # type: ignore[attr-defined]


def test_a_metrics_port_adds_the_metrics_server_and_the_lag_report() -> None:
    app = create_app(_settings(metrics_port=19999))
    assert [task.__name__ for task in app._app_tasks] == ["tick", "serve_metrics", "report_lag"]


def test_an_unreadable_pages_record_is_a_dead_letter_not_an_error() -> None:
    step = Worker(_settings(metrics_port=None)).handle(b"not json", partition=3)
    assert [(d.reason, d.sync_key) for d in step.dead_letters] == [("unreadable pages record", "partition-3")]
