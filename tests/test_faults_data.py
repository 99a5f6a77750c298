"""Faults of issue 23 in the data a run reads, each as real CLI runs (docs/reliability.md): a shard file
deleted or truncated under a finished store, a student reused across image sets, inputs that crashed
(Parquet prompts in `sample`, a 200k-row CSV with quoted newlines, a full disk in generate) or lied
(16-bit and RGBA images)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runner import read_record, records_dir
from schemas.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPAIR = "flowsteer status --verify --repair"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def states_shard(cfg, shard: int) -> Path:
    """The states file of one shard of the config's trajectory store."""
    (path,) = [p for p in (cfg.stage_dir("generate") / "store.zarr" / "states" / "c" / str(shard)).rglob("*")
               if p.is_file()]
    return path


def states(cfg) -> np.ndarray:
    from pipeline.store import TrajectoryStore

    return np.asarray(TrajectoryStore.open(cfg.stage_dir("generate")).states[:])


PERFLOW_2_STEPS = {"methods": ["perflow"], "steps": 2, "checkpoint_every": 2}


# ---------------------------------------------------------------- shards that went missing or were cut short
def test_a_deleted_shard_file_is_redone_by_generate_and_refused_by_train(make_toy_config):
    path = make_toy_config(train=PERFLOW_2_STEPS)
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    before = states(cfg)
    rec = read_record(cfg.stage_dir("generate"), "shard-00001")
    assert rec["files"][str(states_shard(cfg, 1).relative_to(cfg.stage_dir("generate") / "store.zarr"))] > 0
    states_shard(cfg, 1).unlink()
    res = cli("generate", "-c", path)                 # not skipped as done: written again, bitwise the same
    assert res.exit_code == 0, res.output
    assert np.array_equal(states(cfg), before)
    states_shard(cfg, 1).unlink()
    res = cli("train", "-c", path)                    # never 16 rows of zeros
    assert res.exit_code == 2, res.output
    (line,) = error_lines(res.output)
    assert str(cfg.stage_dir("generate") / "store.zarr") in line and "shard 1" in line and REPAIR in line
    assert not (cfg.train_dir(cfg.train_run("perflow")) / "losses.jsonl").exists()


def test_a_truncated_shard_is_one_line_in_train_and_repaired(make_toy_config):
    path = make_toy_config(train=PERFLOW_2_STEPS)
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    before = states(cfg)
    shard = states_shard(cfg, 0)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = cli("train", "-c", path)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = error_lines(res.output)
    assert "shard 0" in line and REPAIR in line and "bytes" in line
    res = cli("status", "-c", path, "--verify", "--repair")
    assert "generate/shard-00000" in res.output and "will be redone" in res.output
    assert cli("generate", "-c", path).exit_code == 0
    assert np.array_equal(states(cfg), before)
    assert cli("train", "-c", path).exit_code == 0


def test_a_truncated_shard_with_an_older_record_is_named_not_a_checksum_traceback(make_toy_config):
    """A record without file sizes (written before they were kept): Zarr's `Stored and computed checksum do
    not match` becomes one line naming the store, the shard and the repair command."""
    path = make_toy_config(train=PERFLOW_2_STEPS)
    cfg = load_config(path)
    assert cli("generate", "-c", path).exit_code == 0
    for key in ("shard-00000", "shard-00001"):
        rec_path = records_dir(cfg.stage_dir("generate")) / f"{key}.json"
        rec = json.loads(rec_path.read_text())
        rec.pop("files")
        rec_path.write_text(json.dumps(rec))
    shard = states_shard(cfg, 0)
    shard.write_bytes(shard.read_bytes()[:-16])
    res = cli("train", "-c", path)
    assert res.exit_code != 0 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert str(cfg.stage_dir("generate") / "store.zarr") in line and "shard 0" in line and REPAIR in line


# ---------------------------------------------------------------- the train fingerprint covers the images read
def _image_set(folder: Path, value: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), value + 10 * i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square {i}")
    return str(folder)


def test_a_student_trained_on_other_images_is_not_reused(make_toy_config, tmp_path):
    train = {**PERFLOW_2_STEPS, "method_options": {"perflow": {"x0": "real"}}}
    a = make_toy_config("a.yaml", data={"images": _image_set(tmp_path / "set-a", 20)}, train=train)
    b = make_toy_config("b.yaml", data={"images": _image_set(tmp_path / "set-b", 200)}, train=train)
    for p in (a, b):
        assert cli("generate", "-c", p).exit_code == 0
    assert cli("encode", "-c", a).exit_code == 0
    assert cli("train", "-c", a).exit_code == 0
    assert cli("encode", "-c", b).exit_code == 0
    res = cli("train", "-c", b)
    assert res.exit_code == 0 and "(0 skipped" in res.output, res.output     # trained anew on set b
    dirs = [load_config(p).train_dir(load_config(p).train_run("perflow")) for p in (a, b)]
    assert dirs[0] != dirs[1] and all((d / "export" / "flowsteer.json").is_file() for d in dirs)


# ---------------------------------------------------------------- inputs that crashed
def test_sample_without_prompts_uses_the_runs_parquet_prompts(make_toy_config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a red square", "a blue circle"]}), prompts)
    path = make_toy_config(generate={"prompts": str(prompts)})
    assert cli("generate", "-c", path).exit_code == 0          # the store's prompts.parquet copy exists now
    out = tmp_path / "s.png"
    res = cli("sample", "teacher", "-c", path, "-n", 2, "--per-prompt", 1, "-o", out)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert out.is_file() and out.stat().st_size > 0


def test_a_200k_row_csv_with_quoted_newlines_is_read_whole(make_toy_config, tmp_path):
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "id"])
        for i in range(200_000):
            w.writerow([f"a photo\nof thing {i}" if i % 7 == 0 else f"thing {i}", i])
    path = make_toy_config(generate={"prompts": str(prompts), "samples_per_prompt": 1, "shard_size": 40_000})
    res = cli("status", "-c", path)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    (row,) = [line.split() for line in res.output.splitlines() if line.startswith("generate")]
    assert row[1:4] == ["0", "5", "0"]                          # 200 000 prompts = 5 shards of 40 000
    from pipeline.datasets import text_batches

    rows = [r for batch in text_batches(prompts) for r in batch]
    assert len(rows) == 200_000 and rows[7] == "a photo\nof thing 7"


def test_disk_full_in_generate_names_the_file(make_toy_config, tiny_tmpfs):
    fill = tiny_tmpfs / "filler"
    path = make_toy_config(root=str(tiny_tmpfs / "runs"), teacher={
        "factory": "fault_teachers:make_disk_filling_toy_teacher", "kwargs": {"fill": str(fill)}})
    cfg = load_config(path)
    res = cli("generate", "-c", path)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    (line,) = error_lines(res.output)
    assert "No space left on device" in line and str(cfg.stage_dir("generate") / "store.zarr") in line
    fill.unlink()                                               # space freed: the rerun finishes the store
    res = cli("generate", "-c", path)
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- images read as they are
def _encoded(cfg) -> np.ndarray:
    from pipeline.latents import LatentStore

    store = LatentStore.open(cfg.stage_dir("encode"))
    return store.latents(np.arange(store.num_samples))


def test_16_bit_and_rgba_images_encode_to_their_values(make_toy_config, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)          # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(folder / "a16.png")
    assert Image.open(folder / "a16.png").mode.startswith("I;16")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255                                           # top opaque red, bottom transparent red
    Image.fromarray(rgba, "RGBA").save(folder / "b_rgba.png")
    for name in ("a16", "b_rgba"):
        (folder / f"{name}.txt").write_text("a picture")
    path = make_toy_config(data={"images": str(folder)})
    assert cli("generate", "-c", path).exit_code == 0
    res = cli("encode", "-c", path)
    assert res.exit_code == 0, res.output
    grey16, rgba_out = _encoded(load_config(path))                 # the toy teacher's latents are its pixels
    np.testing.assert_allclose(grey16[0], ramp / 65535.0 * 2 - 1, atol=1e-4)
    assert grey16.max() < 0.95                                     # not clipped to white through 8 bits
    opaque, clear = rgba_out[0, :4], rgba_out[0, 4:]
    np.testing.assert_allclose(clear, 1.0)                         # composited on white (data.alpha_background)
    np.testing.assert_allclose(opaque, round(0.299 * 200) / 127.5 - 1, atol=1e-6)


def test_alpha_refused_when_asked_names_the_file(make_toy_config, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(folder / "clear.png")
    (folder / "clear.txt").write_text("nothing")
    path = make_toy_config(data={"images": str(folder), "alpha_background": "refuse"})
    assert cli("generate", "-c", path).exit_code == 0
    res = cli("encode", "-c", path)
    assert res.exit_code != 0 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert str(folder / "clear.png") in line and "alpha" in line

