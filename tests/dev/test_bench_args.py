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


@pytest.mark.parametrize("name", ["ingest", "assembler", "sink", "e2e"])
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


# ---------------------------------------------------------------- bench e2e: its arguments and what it posts


def test_e2e_runs_1m_by_default_and_the_size_from_the_option_or_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.e2e import USERS_ENV, parse_args

    monkeypatch.delenv(USERS_ENV, raising=False)
    args = parse_args([])
    assert (args.users, args.scale_out, args.no_followup, args.quick) == (1_000_000, False, False, False)
    assert parse_args(["--users", "10000000"]).users == 10_000_000
    monkeypatch.setenv(USERS_ENV, "10000000")  # how `make bench` runs 10M
    assert parse_args([]).users == 10_000_000
    scale = parse_args(["--scale-out", "--segments", "8", "--broker", "tansu"])
    assert (scale.scale_out, scale.segments, scale.broker, scale.stages) == (True, 8, "tansu", False)
    assert parse_args(["--scale-out", "--stages"]).stages


def test_e2e_stages_goes_with_scale_out(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.e2e import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stages"])
    assert "--stages goes with --scale-out" in capsys.readouterr().err


def test_e2e_refuses_a_size_of_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.e2e import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--users", "0"])
    assert "--users" in capsys.readouterr().err


def test_e2e_is_a_broker_bound_benchmark_of_make_bench() -> None:
    from bench.__main__ import BENCHMARKS, BROKER_BOUND

    assert "e2e" in BENCHMARKS and "e2e" in BROKER_BOUND
    assert split_args(["e2e", "--users", "5000"]) == (["e2e"], ["--users", "5000"])


def test_the_initial_sync_posts_every_user_once_in_pages_of_1000() -> None:
    from bench.e2e import SyncPlan

    plan = SyncPlan("s", "7", "initial", 2_500)
    pages = [plan.page(n) for n in range(1, plan.pages + 1)]
    assert [len(a) for a, _ in pages] == [1000, 1000, 500] and all(not r for _, r in pages)
    assert {i for a, _ in pages for i in a} == plan.expected() and len(plan.expected()) == 2_500
    assert plan.ids == 2_500


def test_the_followup_removes_30_percent_and_adds_as_many_new_users() -> None:
    from bench.e2e import SyncPlan

    initial, follow = SyncPlan("a", "7", "initial", 10_000), SyncPlan("b", "7", "followup", 10_000)
    added = {i for n in range(1, follow.pages + 1) for i in follow.page(n)[0]}
    removed = {i for n in range(1, follow.pages + 1) for i in follow.page(n)[1]}
    assert len(added) == len(removed) == 3_000 and follow.ids == 6_000
    assert all(len(a) + len(r) <= 1000 for a, r in (follow.page(n) for n in range(1, follow.pages + 1)))
    assert removed <= initial.expected() and not added & initial.expected()
    assert follow.expected() == (initial.expected() - removed) | added


def test_many_segments_are_posted_together_and_spread_over_the_partitions() -> None:
    import zlib

    from bench.e2e import ACCOUNT, SyncPlan, interleave, spread_segments

    plans = [SyncPlan("a", "1", "initial", 3_000), SyncPlan("b", "2", "initial", 1_000)]
    assert [(p.sync_id, n) for p, n in interleave(plans)] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    from bench.e2e import list_name
    from heapsync.kafka import java_partition

    segments = spread_segments(6, 6)
    assert len(set(segments)) == 6
    assert len({zlib.crc32(f"{ACCOUNT}:{s}".encode()) % 6 for s in segments}) == 6  # pages: one worker's share each
    assert len({java_partition(f"{ACCOUNT}:{list_name(s)}".encode(), 6) for s in segments}) == 6  # deltas: the sinks'
    assert len(spread_segments(8, 6)) == 8  # more segments than partitions: some share one


def test_scale_out_segments_each_have_an_account_and_a_simulator_of_their_own() -> None:
    from bench.e2e import ACCOUNT, SyncPlan, accounts_toml, delta_partition, page_partition, spread_keys
    from heapsync.settings import parse_accounts

    keys = spread_keys(6, 6, own_accounts=True)
    assert len({a for a, _ in keys}) == 6 and ACCOUNT not in {a for a, _ in keys}
    assert len({page_partition(s, 6, a) for a, s in keys}) == 6  # one worker's share each
    assert len({delta_partition(s, 6, a) for a, s in keys}) == 6  # one sink's share each
    sims = {a: f"http://127.0.0.1:{9000 + n}" for n, (a, _) in enumerate(keys)}
    accounts = parse_accounts(accounts_toml(sims))  # what the stages load: distinct secrets, each its own Cordial
    assert {a: acc.cordial_base_url for a, acc in accounts.items()} == {a: f"{u}/v2" for a, u in sims.items()}
    plan = SyncPlan("s", keys[0][1], "initial", 10, keys[0][0])  # the poster's child reads the plan back
    assert SyncPlan(**plan.__dict__) == plan and plan.account == keys[0][0]
    assert SyncPlan("s", "7", "initial", 10).account == ACCOUNT  # the default e2e: one account, as before


def test_the_default_e2e_keeps_one_simulator_process_named_as_before() -> None:
    from bench.e2e import ACCOUNT, Stack

    assert Stack(None, Path(".")).accounts == (ACCOUNT,)
    assert Stack(None, Path(".")).simulator_name(ACCOUNT) == "simulator"  # its CPU line is the simulator ceiling's
    assert Stack(None, Path("."), accounts=("bench1", "bench2")).simulator_name("bench2") == "simulator2"
