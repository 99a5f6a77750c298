"""Encode stage: image-caption sets -> latent store (folder / Parquet bytes / JSONL paths / MNIST digits),
resume, `status --verify`, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.latents import LatentStore, latent_store_dir
from pipeline.runner import read_record, run_job
from schemas.config import load_config

TOY = {"describe": "pipeline.teachers.toy:describe_toy_teacher"}


def png_folder(tmp_path, n=7):
    """n random greyscale 12x10 PNGs with a caption file each (two captions repeat)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = (folder / "sub" if i % 2 else folder) / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(p)
        p.with_suffix(".txt").write_text(f"caption {i % 5}\n")
    return folder


def encode(cfg, executor="local", workers=None):
    from stages.encode import jobs

    [job] = jobs(cfg)
    return job, run_job(job, executor, workers=workers, progress=False)


def expected_latents(paths):
    from pipeline.datasets import load_image

    return torch.stack([load_image(p, (1, 8, 8)) for p in paths]).numpy()   # the toy teacher: identity "VAE"


def test_png_folder_gives_a_verifiable_resumable_latent_store(make_toy_config, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.datasets import folder_images
    from pipeline.teachers import load_teacher

    folder = png_folder(tmp_path)
    path = make_toy_config(teacher=TOY, data={"images": str(folder), "shard_size": 3, "batch_size": 2})
    cfg = load_config(path)
    job, st = encode(cfg)
    assert st["done"] == 3 and latent_store_dir(cfg) == job.out_dir
    store = LatentStore.open(job.out_dir)
    images = folder_images(folder)
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    assert store.num_samples == 7 and store.captions(np.arange(7)) == captions
    assert np.array_equal(store.latents(np.arange(7)), expected_latents(images))
    enc = load_teacher(cfg).encode(captions)
    assert all(torch.equal(store.cond(np.arange(7))[k], enc[k].float()) for k in enc)
    assert torch.equal(store.null_cond(1)["pooled_projections"], load_teacher(cfg).encode([""])["pooled_projections"])
    before = np.asarray(store.group["latents"][:]).copy()

    # Corrupt shard 1 on disk: verify finds it and drops its record; the rerun redoes only that shard.
    shard_file = store.path / "latents" / store.group["latents"].metadata.encode_chunk_key((1, 0, 0, 0))
    shard_file.write_bytes(shard_file.read_bytes()[:-9])
    res = CliRunner().invoke(app, ["status", "--verify", "--config", str(path)])
    assert "corrupt: encode/shard-00001" in res.output, res.output
    t0 = read_record(job.out_dir, "shard-00000")["time"]
    _, st = encode(cfg)
    assert (st["done"], st["skipped"]) == (3, 2) and read_record(job.out_dir, "shard-00000")["time"] == t0
    assert np.array_equal(np.asarray(LatentStore.open(job.out_dir).group["latents"][:]), before)


@pytest.mark.parametrize("fmt", ["parquet-bytes", "jsonl-paths"])
def test_table_sources_with_bytes_or_paths(make_toy_config, tmp_path, fmt):
    from pipeline.datasets import folder_images

    folder = png_folder(tmp_path, n=5)
    images = folder_images(folder)
    caps = [f"row {i}" for i in range(5)]
    if fmt == "parquet-bytes":
        src = tmp_path / "set.parquet"
        pq.write_table(pa.table({"caption": caps, "image": [p.read_bytes() for p in images]}), src, row_group_size=2)
    else:
        src = folder / "set.jsonl"
        src.write_text("".join(json.dumps({"text": c, "file": str(p.relative_to(folder))}) + "\n"
                               for c, p in zip(caps, images)))
    extra = {} if fmt == "parquet-bytes" else {"image_column": "file"}
    cfg = load_config(make_toy_config(teacher=TOY, data={"images": str(src), "shard_size": 2, "limit": 4, **extra},
                                      generate={"store_dtype": "bfloat16"}))
    job, st = encode(cfg)
    store = LatentStore.open(job.out_dir)
    assert st["done"] == 2 and store.num_samples == 4 and store.captions([3, 0]) == ["row 3", "row 0"]
    assert str(store.group["latents"].dtype) == "uint16"                    # bfloat16 as raw bits
    want = expected_latents(images[:4])
    got = store.latents(np.arange(4))
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-2) and not np.array_equal(got, want)


def test_embedded_teacher_encodes_the_training_digits(embedded_tiny):
    from pipeline.digits import load_digits, prompt_for

    _, cfg = embedded_tiny
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": 40, "shard_size": 16})})
    job, st = encode(cfg)
    store = LatentStore.open(job.out_dir)
    images, labels = load_digits()
    assert st["done"] == 3 and store.num_samples == 40 and store.sample_shape == (1, 32, 32)
    assert np.array_equal(store.latents(np.arange(40)), images[:40].numpy())          # identity "VAE"
    assert store.captions([5]) == [prompt_for(int(labels[5]))]


def test_bad_image_sets_are_one_line(make_toy_config, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = png_folder(tmp_path, n=3)
    (folder / "img0.txt").unlink()
    path = make_toy_config(teacher=TOY, data={"images": str(folder)})
    res = CliRunner().invoke(app, ["encode", "--config", str(path)])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"error: data.images: {folder / 'img0.png'} has no caption file img0.txt beside it"]
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"caption": ["a"], "pixels": [b"x"]}), src)
    path = make_toy_config("b.yaml", teacher=TOY, data={"images": str(src)})
    res = CliRunner().invoke(app, ["encode", "--config", str(path)])
    assert res.exit_code == 2 and "none of the columns image, image_path, path (columns found: caption, pixels)" \
        in res.output
    assert not load_config(path).stage_dir("encode").exists()
