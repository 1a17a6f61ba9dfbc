"""The dev-only commands come from heapsync_dev through an entry point; without it the CLI still works.

The production image leaves heapsync_dev out (Dockerfile): ``heapsync`` must then list and run
every operator command and simply not offer ``dev``, ``simulator``, ``kafka`` or ``send-sample``.
"""

from __future__ import annotations

import subprocess
import sys

DEV_COMMANDS = {"dev", "simulator", "kafka", "send-sample"}
OPS_COMMANDS = {"ingest", "process", "sink", "archive", "status", "dlq", "replay", "topics", "schema"}


def _help(block_dev: bool) -> str:
    code = ("import sys\n"
            + ("sys.modules['heapsync_dev'] = None  # as if the package were not installed\n" if block_dev else "")
            + "from heapsync_ops.cli import cli\n"
              "cli(['--help'], prog_name='heapsync')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _commands(help_text: str) -> set[str]:
    section = help_text.split("Commands:", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.strip()}


def test_an_install_with_the_dev_tooling_lists_every_command() -> None:
    assert DEV_COMMANDS | OPS_COMMANDS <= _commands(_help(block_dev=False))


def test_without_the_dev_tooling_the_operator_commands_remain() -> None:
    commands = _commands(_help(block_dev=True))
    assert OPS_COMMANDS <= commands
    assert not commands & DEV_COMMANDS
