"""The CLI end to end on the toy byo teacher: stage runs, status counts, failures and user errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runner import read_record
from schemas.config import load_config

FLOWSTEER = Path(sys.executable).parent / "flowsteer"


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def status_row(output: str, stage: str) -> tuple[int, int, int]:
    """(done, pending, failed) from the stage's line of `flowsteer status`."""
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] == stage and parts[1].isdigit():
            return int(parts[1]), int(parts[2]), int(parts[3])
    raise AssertionError(f"no row for {stage} in:\n{output}")


def test_teacher_check_unit_and_status_counts(toy_config):
    cfg = load_config(toy_config)
    before = run_cli("status", "-c", toy_config)
    assert before.exit_code == 0, before.output
    assert status_row(before.output, "teacher") == (0, 1, 0)

    result = run_cli("teacher", "-c", toy_config)
    assert result.exit_code == 0, result.output
    rec = read_record(cfg.stage_dir("teacher"), "check")
    assert rec["status"] == "done" and rec["sample_shape"] == [1, 8, 8]
    assert status_row(run_cli("status", "-c", toy_config).output, "teacher") == (1, 0, 0)

    again = run_cli("teacher", "-c", toy_config)
    assert "1 skipped as already done" in again.output
    assert read_record(cfg.stage_dir("teacher"), "check")["time"] == rec["time"]


def test_failed_unit_shows_its_message_and_exits_1(make_toy_config):
    path = make_toy_config("broken.yaml", teacher={"kwargs": {"no_such_arg": 3}})
    result = run_cli("teacher", "-c", path)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]              # (the progress bar also writes to stderr)
    assert last.startswith("error: teacher: 1 unit(s) failed") and "no_such_arg" in last
    status = run_cli("status", "-c", path)
    assert status_row(status.output, "teacher") == (0, 0, 1)
    assert "failed check: TypeError" in status.output and "no_such_arg" in status.output


def test_sd3_missing_dir_is_a_user_error(make_toy_config, tmp_path):
    path = make_toy_config("sd3.yaml", teacher={"kind": "sd3", "path": str(tmp_path / "no_model"),
                                                "factory": None})
    result = run_cli("teacher", "-c", path)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: teacher.path {tmp_path / 'no_model'} does not exist "
                                                  "(expected a local diffusers SD3 pipeline directory, e.g. one "
                                                  "written by StableDiffusion3Pipeline.save_pretrained)"]


def test_installed_entry_point_reports_config_errors(tmp_path):
    """The real console script, as a user runs it: a typo is one line on stderr and exit code 2."""
    bad = tmp_path / "typo.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    proc = subprocess.run([str(FLOWSTEER), "teacher", "--config", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: unknown key 'trian'"
    assert proc.stdout == ""
