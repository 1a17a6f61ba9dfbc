"""The benchmark harness's arguments: which broker(s) a run uses, and ``python -m bench NAME --help``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import split_args, without_broker
from bench.brokers import selected_brokers

ROOT = Path(__file__).resolve().parents[2]


def test_both_brokers_by_default_when_java_and_maven_are_there() -> None:
    assert selected_brokers(None, []) == (["tansu", "kafka"], None)


def test_tansu_only_with_one_line_saying_why_when_a_tool_is_missing() -> None:
    kinds, note = selected_brokers(None, ["mvn"])
    assert kinds == ["tansu"]
    assert note is not None and "mvn not on PATH" in note


@pytest.mark.parametrize(("choice", "kinds"), [("tansu", ["tansu"]), ("kafka", ["kafka"]),
                                               ("both", ["tansu", "kafka"])])
def test_an_explicit_choice_wins_over_what_is_installed(choice: str, kinds: list[str]) -> None:
    assert selected_brokers(choice, ["java", "mvn"]) == (kinds, None)


def test_an_unknown_broker_is_refused() -> None:
    with pytest.raises(ValueError, match="choose tansu, kafka or both"):
        selected_brokers("redpanda", [])


def test_names_pick_benchmarks_and_the_rest_goes_to_them() -> None:
    assert split_args(["ingest", "--help"]) == (["ingest"], ["--help"])
    assert split_args(["--broker", "kafka", "assembler", "sink"]) == (["assembler", "sink"], ["--broker", "kafka"])
    assert without_broker(["--broker", "kafka", "--quick", "--broker=tansu"]) == ["--quick"]


@pytest.mark.parametrize("name", ["ingest", "assembler", "sink"])
def test_help_of_one_benchmark_prints_its_options_and_runs_nothing(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", name, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"usage: python -m bench {name}" in done.stdout
    assert "--broker {tansu,kafka,both}" in done.stdout
    assert "broker:" not in done.stdout  # no broker was started


def test_an_unknown_benchmark_is_an_error_not_a_silent_skip() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "ingset"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "unknown benchmark 'ingset'" in done.stderr


def test_one_broker_failing_still_runs_the_other_and_fails_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.brokers import BenchFailed, run_each

    ran = []

    def run(kind: str) -> None:
        ran.append(kind)
        if kind == "kafka":
            raise TimeoutError("delta incomplete after 180s")

    with pytest.raises(BenchFailed, match="assembler failed on kafka"):
        run_each("assembler", ["kafka", "tansu"], run)
    assert ran == ["kafka", "tansu"]
    assert "[assembler] FAILED on Apache Kafka" in capsys.readouterr().out
