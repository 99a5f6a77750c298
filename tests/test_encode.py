"""Encode stage: image-caption sets -> latent store (folder / Parquet bytes / JSONL paths / MNIST digits),
resume, `status --verify`, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

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
                                      encode={"store_dtype": "bfloat16"}))
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


def test_embedded_real_data_is_read_from_the_latent_store(embedded_tiny):
    """One real-data path: the embedded teacher's x0 rows are the encoded digits, drawn from the latent store
    (data.limit: 40 keeps every draw among the first 40 digits), with their captions' stored conditions."""
    from pipeline.data import DataSource
    from pipeline.digits import load_digits, prompt_for
    from pipeline.errors import UserError
    from pipeline.teachers import load_teacher

    _, base = embedded_tiny
    cfg = base.model_copy(update={"data": base.data.model_copy(update={"limit": 40, "shard_size": 16})})
    encode(cfg)
    teacher = load_teacher(cfg)
    images, labels = load_digits()
    data = DataSource(cfg, teacher, None, "cpu", torch.Generator().manual_seed(0))
    drawn = [data.real(16) for _ in range(3)]                  # 48 rows: one whole 40-row epoch, then the next
    rows = torch.cat([d["index"] for d in drawn])
    assert sorted(rows[:40].tolist()) == list(range(40))
    for d in drawn:
        assert torch.equal(d["x0"], images[d["index"]])
        enc = teacher.encode([prompt_for(int(y)) for y in labels[d["index"]]])
        assert all(torch.allclose(d["cond"][k], enc[k].float(), atol=1e-5) for k in enc)
    other = base.model_copy(update={"data": base.data.model_copy(update={"limit": 41})})      # never encoded
    with pytest.raises(UserError, match="no latent store .*run `flowsteer encode` first"):
        DataSource(other, teacher, None, "cpu", torch.Generator().manual_seed(0)).real(4)


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


def test_sd3_layout_from_config_files_and_vae_latents(tmp_path):
    """describe_teacher reads the SD3 dir's configs only and matches what the loaded pipeline produces;
    encode_images is the VAE mean with SD3's shift and scaling factor (decode's inverse normalisation)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_sd3 import build_tiny_sd3_pipeline

    from pipeline.teachers import describe_teacher, load_teacher
    from schemas.config import RunConfig

    cfg = RunConfig.model_validate({"teacher": {"kind": "sd3", "path": str(build_tiny_sd3_pipeline(tmp_path / "sd3"))}})
    assert cfg.generate.store_dtype == cfg.encode.store_dtype == "float16"      # the sd3 default
    layout = describe_teacher(cfg)
    teacher = load_teacher(cfg)
    enc = teacher.encode(["a cat", ""])
    assert layout.sample_shape == teacher.sample_shape
    assert layout.cond_shapes == {k: tuple(v.shape[1:]) for k, v in enc.items()}
    images = torch.rand(2, *layout.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = teacher.encode_images(images)
    vae = teacher.pipeline.vae
    with torch.no_grad():
        ref = (vae.encode(images).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert z.shape == (2, *layout.sample_shape) and z.dtype == torch.float32 and torch.allclose(z, ref)


def test_store_dtype_defaults_and_fingerprints(make_toy_config):
    from schemas.config import RunConfig

    assert RunConfig().generate.store_dtype == RunConfig().encode.store_dtype == "float32"          # embedded
    base = load_config(make_toy_config())
    fp = {k: base.fingerprint(k) for k in ("generate", "encode")}
    for name, over in {"dev": {"device": "cuda:1"}, "tdtype": {"teacher": {"dtype": "bfloat16"}}}.items():
        other = load_config(make_toy_config(f"{name}.yaml", **over))
        assert other.fingerprint("generate") != fp["generate"] and other.fingerprint("encode") != fp["encode"], name
    for stage, other in (("generate", "encode"), ("encode", "generate")):   # each stage's store settings are its own
        for name, over in {"f16": {"store_dtype": "float16"}, "zstd": {"compressor": "zstd"}}.items():
            changed = load_config(make_toy_config(f"{stage}-{name}.yaml", **{stage: over}))
            assert changed.fingerprint(stage) != fp[stage] and changed.fingerprint(other) == fp[other], (stage, name)
    same = load_config(make_toy_config("b.yaml", generate={"batch_size": 3}, data={"shard_size": 256}))
    assert same.fingerprint("generate") == fp["generate"]
    workers = load_config(make_toy_config("w.yaml", encode={"cpus_per_worker": 2, "gpus_per_worker": 1, "max_retries": 0}))
    assert workers.fingerprint("encode") == fp["encode"]       # how encode runs is not what it writes


@pytest.mark.timeout(600)
def test_ray_encode_equals_local(make_toy_config, tmp_path):
    """--executor ray runs the shards on the runner's actors, as generate does: same bytes, same records as local."""
    import ray

    folder = png_folder(tmp_path)
    data = {"images": str(folder), "shard_size": 2}
    local = load_config(make_toy_config("local.yaml", teacher=TOY, data=data))
    job_l, _ = encode(local)
    remote = load_config(make_toy_config("ray.yaml", root=str(tmp_path / "ray-runs"), teacher=TOY, data=data))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        job_r, st = encode(remote, "ray", workers=1)
    finally:
        ray.shutdown()
    assert st["done"] == 4 and st["failed"] == 0
    a, b = LatentStore.open(job_l.out_dir), LatentStore.open(job_r.out_dir)
    for name in ("latents", "prompt_embeds", "pooled_embeds", "null_pooled_embeds"):
        assert np.array_equal(np.asarray(a.group[name][:]), np.asarray(b.group[name][:])), name
    assert [read_record(job_r.out_dir, u.key)["checksum"] for u in job_r.units] == \
        [read_record(job_l.out_dir, u.key)["checksum"] for u in job_l.units]
