"""`flowsteer sample`: PNG grids from the teacher (fixed / diffusers schedule) and from an exported student."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TOY_PROMPTS
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.sample_cli import SEED_STRIDE, sample_grid
from pipeline.sampling import sample
from pipeline.schedule import make_sigmas
from schemas.config import load_config

PAD = 2


def tiles(path, rows, cols, size=8) -> torch.Tensor:
    """Cut a saved grid back into its [rows, cols, H, W] tiles (grey, in [0, 1])."""
    img = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255)
    assert img.shape == (rows * (size + PAD) + PAD, cols * (size + PAD) + PAD)
    return torch.stack([torch.stack([img[PAD + r * (size + PAD):][:size, PAD + c * (size + PAD):][:, :size]
                                     for c in range(cols)]) for r in range(rows)])


def run_cli(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def test_teacher_grid_matches_direct_sampling(toy_config, tmp_path):
    from pipeline.seeds import noise_for
    from pipeline.teachers import load_teacher

    out = tmp_path / "grid" / "teacher.png"
    res = run_cli("-c", toy_config, "-p", TOY_PROMPTS[0], "-p", TOY_PROMPTS[1], "--per-prompt", 3, "-n", 2,
                  "--guidance", 2.5, "--seed", 1, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    grid = tiles(out, 2, 3)

    # Row r, column c = prompt r from noise_for((seed << 20) + c), Euler + CFG 2.5 on the 2-step fixed grid.
    cfg = load_config(toy_config)
    teacher = load_teacher(cfg)
    noise = torch.stack([noise_for(SEED_STRIDE + c, teacher.sample_shape) for c in range(3)])
    for r, prompt in enumerate(TOY_PROMPTS[:2]):
        x = sample(teacher.velocity, noise, make_sigmas(2, cfg.schedule.shift), teacher.encode([prompt] * 3),
                   teacher.encode([""] * 3), 2.5)
        torch.testing.assert_close(grid[r], teacher.decode(x)[:, 0], atol=1 / 255 + 1e-6, rtol=0)
    assert not torch.allclose(grid[0], grid[1], atol=2 / 255)       # rows differ by prompt


def test_schedule_seed_and_guidance_change_the_grid(toy_config, tmp_path):
    cfg = load_config(toy_config)
    common = dict(prompts=TOY_PROMPTS, per_prompt=2)

    def grid(name, **kw):
        return tiles(sample_grid(cfg, out=tmp_path / name, **{**common, "steps": 2, **kw}), 3, 2)

    base = grid("a.png")
    torch.testing.assert_close(grid("again.png"), base, atol=0, rtol=0)            # deterministic
    assert not torch.allclose(grid("default.png", schedule="diffusers"), base, atol=2 / 255)
    assert not torch.allclose(grid("seed.png", seed=5), base, atol=2 / 255)
    assert not torch.allclose(grid("w1.png", guidance=1.0), base, atol=2 / 255)   # default is evaluate.guidance


def test_student_export_samples(toy_config, tmp_path):
    from pipeline.methods import get_method
    from pipeline.export import export_student
    from pipeline.student import load_student
    from pipeline.teachers.toy import make_toy_transformer

    cfg = load_config(toy_config)
    export = export_student(tmp_path / "export", "perflow", make_toy_transformer(seed=7), cfg, (1, 8, 8))
    out = sample_grid(cfg, str(export), steps=4, prompts=TOY_PROMPTS[:1], per_prompt=2, out=tmp_path / "s.png")
    grid = tiles(out, 1, 2)

    from pipeline.seeds import noise_for
    from pipeline.teachers import load_teacher

    teacher, student = load_teacher(cfg), load_student(export)
    noise = torch.stack([noise_for(c, (1, 8, 8)) for c in range(2)])
    x = student.sample(noise, teacher.encode(TOY_PROMPTS[:1] * 2), 4)
    torch.testing.assert_close(grid[0], teacher.decode(x)[:, 0], atol=1 / 255 + 1e-6, rtol=0)
    assert get_method("perflow").name == "perflow"

    # A method name resolves to the train stage's export directory.
    trained = cfg.train_dir(cfg.train_run("perflow")) / "export"
    export_student(trained, "perflow", make_toy_transformer(seed=7), cfg, (1, 8, 8))
    res = run_cli("perflow", "-c", toy_config, "-p", TOY_PROMPTS[0], "--per-prompt", 2, "-n", 4,
                  "-o", tmp_path / "m.png")
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(tiles(tmp_path / "m.png", 1, 2), grid, atol=0, rtol=0)
    res = run_cli("perflow", "-c", toy_config, "-p", "x", "--guidance", 3)
    assert res.exit_code == 2 and "teacher only" in res.output


@pytest.mark.parametrize("args,message", [
    (["perflow"], "no exported student for 'perflow'"),
    (["nonsense"], "is not 'teacher', a method name"),
    (["teacher", "--schedule", "karras"], "unknown schedule 'karras'"),
    (["teacher", "--schedule", "default"], "schedule 'default' is spelled 'diffusers'"),
    (["teacher", "-n", 0], "must be >= 1"),
])
def test_user_errors_are_one_line(toy_config, tmp_path, args, message):
    res = run_cli(*args, "-c", toy_config, "-p", "a red square", "-o", tmp_path / "x.png")
    assert res.exit_code == 2
    assert message in res.output and res.output.strip().count("\n") == 0 and res.output.startswith("error: ")
    assert not (tmp_path / "x.png").exists()


def test_byo_teacher_without_a_prompt_file_needs_prompts(make_toy_config, tmp_path):
    with pytest.raises(UserError, match="--prompt"):
        sample_grid(load_config(make_toy_config(generate={"prompts": None})), out=tmp_path / "x.png")


def test_no_prompt_defaults_to_the_runs_prompt_file(toy_config, tmp_path):
    """`flowsteer sample` with no --prompt on a run with generate.prompts: one row per prompt of that file."""
    res = run_cli("-c", toy_config, "--per-prompt", 2, "-n", 2, "-o", tmp_path / "run.png")
    assert res.exit_code == 0, res.output
    explicit = run_cli("-c", toy_config, *[a for p in TOY_PROMPTS for a in ("-p", p)], "--per-prompt", 2, "-n", 2,
                       "-o", tmp_path / "explicit.png")
    assert explicit.exit_code == 0, explicit.output
    assert torch.equal(tiles(tmp_path / "run.png", len(TOY_PROMPTS), 2), tiles(tmp_path / "explicit.png", len(TOY_PROMPTS), 2))


def test_embedded_teacher_defaults_to_digit_prompts(embedded_tiny, tmp_path):
    """No --prompt on the embedded default: one row per digit prompt, 32x32 grey tiles."""
    from pipeline.digits import DIGIT_PROMPTS

    path, cfg = embedded_tiny
    res = run_cli("-c", path, "--per-prompt", 2, "-n", 2, "-o", tmp_path / "digits.png")
    assert res.exit_code == 0, res.output
    grid = tiles(tmp_path / "digits.png", len(DIGIT_PROMPTS), 2, size=32)
    assert grid.std() > 0
