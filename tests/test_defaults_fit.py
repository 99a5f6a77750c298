"""Defaults that fit any schedule and teacher (issue 25): the GAN's window rule adapts to schedule.windows,
disc_blocks follows the teacher's depth (an explicit one deeper than it is an error before any work),
use_t5 asked of a directory without T5 is one error line, and `ablate --rows/--seeds` runs part of the ladder."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import toy_sections, write_config
from pipeline.cli import app
from pipeline.methods.flowsteer import window_emphasis
from schemas.config import load_config


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_window_emphasis_reproduces_the_four_window_default_and_adapts():
    assert window_emphasis(4, 0.7) == pytest.approx((0.1, 0.1, 0.1, 0.7))
    for k in (1, 2, 3, 8):
        p = window_emphasis(k, 0.7)
        assert len(p) == k and sum(p) == pytest.approx(1.0) and p[-1] == max(p)
    assert window_emphasis(1, 0.7) == (1.0,)


def test_three_windows_on_a_one_block_teacher_train_with_defaults(tmp_path):
    """schedule.windows 3 (24 teacher steps), the toy byo teacher with 1 block: flowsteer and scflow train with
    every GAN default (window rule, disc_blocks = min(2, 1))."""
    sections = toy_sections(tmp_path)
    sections["schedule"] = {"shift": 3.0, "teacher_steps": 6, "windows": 3}
    sections["train"] = {**sections["train"], "steps": 2, "checkpoint_every": 2,
                         "methods": ["flowsteer", "scflow"]}
    path = write_config(tmp_path / "c.yaml", **sections)
    for stage in ("teacher", "generate", "train"):
        result = run_cli(stage, "-c", path)
        assert result.exit_code == 0, result.output
    cfg = load_config(path)
    for run in cfg.train_runs():
        assert (cfg.train_dir(run) / "export" / "flowsteer.json").is_file()


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_too_deep_disc_blocks_exits_2_before_any_work(tmp_path, command):
    sections = toy_sections(tmp_path)
    sections["train"] = {**sections["train"], "methods": ["flowsteer"], "adversarial": {"disc_blocks": 2}}
    path = write_config(tmp_path / "c.yaml", **sections)
    rows = ["--rows", "ota,flowsteer"] if command == "ablate" else []     # byo: no real data for perflow rows
    one_line_error(run_cli(command, "-c", path, *rows), "disc_blocks is 2", "1 blocks")
    assert not (tmp_path / "runs").exists()                    # nothing ran: not even the teacher stage


def test_a_run_option_too_deep_is_caught_too(tmp_path):
    sections = toy_sections(tmp_path)
    sections["train"] = {**sections["train"], "methods": ["deep"],
                         "variants": {"deep": {"method": "flowsteer", "options": {"disc_blocks": 3}}}}
    path = write_config(tmp_path / "c.yaml", **sections)
    one_line_error(run_cli("train", "-c", path), "disc_blocks is 3")


def test_explicit_window_probs_must_match_the_windows(tmp_path):
    sections = toy_sections(tmp_path)
    sections["schedule"] = {"shift": 3.0, "teacher_steps": 6, "windows": 3}
    sections["train"] = {**sections["train"], "methods": ["flowsteer"],
                         "adversarial": {"window_probs": [0.1, 0.1, 0.1, 0.7]}}
    path = write_config(tmp_path / "c.yaml", **sections)
    one_line_error(run_cli("train", "-c", path), "window_probs", "must be 3")


def test_use_t5_on_a_directory_without_t5_is_one_error_line(tmp_path):
    from tiny_sd3 import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(tmp_path / "sd3")          # no text_encoder_3
    path = write_config(tmp_path / "c.yaml", root=str(tmp_path / "runs"),
                        teacher={"kind": "sd3", "path": str(pipe), "kwargs": {"use_t5": True}},
                        train={"methods": ["ota"]})           # perflow would ask for data.images first
    one_line_error(run_cli("teacher", "-c", path), "use_t5 is true", "no T5")
    assert not (tmp_path / "runs").exists()


def test_ablate_rows_and_seeds_choose_part_of_the_ladder(tmp_path):
    from pipeline.ladder import LadderError, with_ladder

    cfg = load_config(write_config(tmp_path / "c.yaml", **toy_sections(tmp_path)))
    part = with_ladder(cfg, ["flowsteer", "ota"], [1])
    assert part.train.methods == ["ota", "flowsteer"] and part.train.seeds == [1]   # ladder order
    whole = with_ladder(cfg)
    run = part.train_runs(["ota"])[0]
    assert part.train_dir(run) == whole.train_dir(whole.train_run("ota", 0)).with_name(part.train_dir(run).name)
    assert part.fingerprint("train", run) == whole.fingerprint("train", whole.train_run("ota", 0).__class__(
        "ota", "ota", {}, 1))
    with pytest.raises(LadderError, match="'otaa' is not a ladder row"):
        with_ladder(cfg, ["otaa"])
    one_line_error(run_cli("ablate", "-c", tmp_path / "c.yaml", "--rows", "nope"), "--rows", "nope")
    one_line_error(run_cli("ablate", "-c", tmp_path / "c.yaml", "--seeds", "a,b"), "--seeds")
