"""The errors meant for people: each carries its exit code and run status, which the command's one handler
(`cli.main`) and the run record (`runinfo.outcome`) read off it."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import errors, runinfo, together

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "error, status, code",
    [
        (errors.ConfigError("bad key"), "failed", 2),
        (errors.DataError("missing file"), "failed", 2),
        (errors.DiskFull("disk full while writing"), "failed", 2),
        (errors.CompareError("not a run folder"), "failed", 2),
        (errors.Diverged("loss is nan"), "diverged", 3),
        (errors.Preempted("stopped on SIGTERM"), "preempted", 143),
        (errors.Preempted("stopped on Ctrl-C", exit_code=130), "preempted", 130),
        (KeyboardInterrupt(), "interrupted", 130),
        (ValueError("a bug"), "failed", 1),
        (None, "finished", 0),
    ],
)
def test_the_run_status_and_exit_code_come_from_the_error(error, status, code):
    assert runinfo.outcome(error) == (status, code)


def test_a_full_disk_is_its_own_error_and_reaches_every_process_as_itself():
    assert issubclass(errors.DiskFull, errors.DataError)  # callers that stop on bad data stop on it too
    again = together.raised(together.verdict(errors.DiskFull("disk full while writing the shards")))
    assert type(again) is errors.DiskFull and str(again) == "disk full while writing the shards"


def test_the_command_prints_the_error_and_exits_with_its_code(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "from pipeline import cli, errors\n"
        "def run(recipe, cfg):\n    raise errors.Diverged('the loss is nan at step 3')\n"
        "cli.main('fails', '', run, parse_argv=lambda argv: (None, None))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert result.returncode == 3 and result.stderr.strip() == "error: the loss is nan at step 3"
