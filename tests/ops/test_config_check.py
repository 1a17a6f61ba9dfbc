"""A bad configuration says so at once (issue 13 #1): every command checks the settings and the
accounts file before it starts anything: one line naming the file, the account and the key,
exit status 2, no traceback, nothing left running. Run through the real CLI, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heapsync_dev.processes import free_port
from tests.dev.test_dev import processes_in

BAD_ACCOUNTS = (
    "[accounts.acme]\n"
    'heap_webhook_secrets = ["s3cret"]\n'
    'cordial_api_kye = "key"\n'  # the typo an operator makes
)


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HEAPSYNC_")}
    # a broker address nothing listens on: if a command started anything, it would hang or fail later, not exit 2
    clean["HEAPSYNC_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"
    return subprocess.run([sys.executable, "-m", "heapsync_ops.cli", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["dev", "--port", "0", "--sim-port", "0"], ["ingest"], ["process"], ["sink"],
                                     ["archive"], ["status"]])
def test_a_bad_accounts_file_is_one_line_and_exit_2(command: list[str], tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(BAD_ACCOUNTS)
    result = run_cli(command, tmp_path, HEAPSYNC_ACCOUNTS_FILE=str(accounts))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: {accounts}: accounts.acme: cordial_api_kye: Extra inputs are not permitted"]
    assert "s3cret" not in result.stderr
    assert processes_in(tmp_path) == []  # nothing left running (dev starts its broker nowhere)
    assert not (tmp_path / ".heapsync").exists()  # and wrote nothing


@pytest.mark.parametrize("command", [["ingest"], ["sink"]])
def test_a_missing_accounts_file_stops_the_stages_that_need_it(command: list[str], tmp_path: Path) -> None:
    result = run_cli(command, tmp_path, HEAPSYNC_ACCOUNTS_FILE=str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot read accounts file {tmp_path / 'nope.toml'}: No such file or directory"]


@pytest.mark.parametrize("command", [["process"], ["dev"], ["ingest"], ["status"]])
def test_an_invalid_setting_is_one_line_naming_the_variable(command: list[str], tmp_path: Path) -> None:
    result = run_cli(command, tmp_path, HEAPSYNC_TOPIC_PARTITIONS="0", HEAPSYNC_SINK_FILES_SECRET="",
                     HEAPSYNC_SINK_MAX_RETRIES="many")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: settings: HEAPSYNC_TOPIC_PARTITIONS: Input should be greater than or equal to 1; "
        "HEAPSYNC_SINK_MAX_RETRIES: Input should be a valid integer, unable to parse string as an integer"]
    assert processes_in(tmp_path) == []


def test_send_sample_with_a_bad_accounts_file(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(BAD_ACCOUNTS)
    result = run_cli(["send-sample", "--account", "acme"], tmp_path, HEAPSYNC_ACCOUNTS_FILE=str(accounts))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {accounts}: accounts.acme: cordial_api_kye: Extra inputs are not permitted"]


def test_process_runs_its_check_only_on_a_file_it_is_given_or_finds(tmp_path: Path) -> None:
    """The default accounts file is optional for the worker (it reads no account): absent, it is not an error."""
    result = run_cli(["process", "--help"], tmp_path)
    assert result.returncode == 0
    from heapsync_ops.cli import _checked

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        env = os.environ.pop("HEAPSYNC_ACCOUNTS_FILE", None)
        settings, accounts = _checked()
        assert accounts == {} and settings.accounts_file == Path("accounts.toml")
        (tmp_path / "accounts.toml").write_text(BAD_ACCOUNTS)
        with pytest.raises(Exception, match="cordial_api_kye: Extra inputs are not permitted"):
            _checked()
    finally:
        os.chdir(cwd)
        if env is not None:
            os.environ["HEAPSYNC_ACCOUNTS_FILE"] = env
