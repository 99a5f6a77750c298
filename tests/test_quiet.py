"""Library loading bars and logs are off under the CLI unless --verbose; used as a library, untouched."""
from __future__ import annotations

import logging
import os

import pytest
from typer.testing import CliRunner

import pipeline.quiet as quiet
from pipeline.cli import app


@pytest.fixture
def restore(monkeypatch):
    """Each test starts with the variable unset and leaves the libraries as it found them."""
    import diffusers.utils.logging as dlog

    for key in (quiet.VERBOSE_ENV, *quiet.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)
    level, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    monkeypatch.setattr(quiet, "_applied", False)
    yield dlog
    dlog.set_verbosity(level)
    dlog.enable_progress_bar() if bars else dlog.disable_progress_bar()


def test_library_use_leaves_logging_alone(restore):
    dlog = restore
    dlog.enable_progress_bar()
    quiet.quiet_libraries()                                   # no CLI: FLOWSTEER_VERBOSE unset
    assert dlog.is_progress_bar_enabled()


def test_cli_default_silences_and_verbose_keeps_them(restore, tmp_path):
    dlog = restore
    dlog.enable_progress_bar()
    dlog.set_verbosity(logging.INFO)
    res = CliRunner().invoke(app, ["--verbose", "init", str(tmp_path / "a.yaml")])
    assert res.exit_code == 0 and os.environ[quiet.VERBOSE_ENV] == "1"
    quiet.quiet_libraries()
    assert dlog.is_progress_bar_enabled() and dlog.get_verbosity() == logging.INFO

    res = CliRunner().invoke(app, ["init", str(tmp_path / "b.yaml")])
    assert res.exit_code == 0 and os.environ[quiet.VERBOSE_ENV] == "0"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"    # inherited by Ray workers
    quiet.quiet_libraries()                                   # what load_teacher / load_student call
    assert not dlog.is_progress_bar_enabled() and dlog.get_verbosity() == logging.ERROR
