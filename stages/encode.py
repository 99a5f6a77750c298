"""Encode stage: real images through the teacher's `encode_images`, captions through its prompt encoder,
into the latent store (pipeline/latents.py; docs/store.md).

Sources: `data.images` (an image folder with a .txt caption per image, or Parquet / JSONL / HF datasets
rows with an image path or bytes and a caption) or, for the embedded teacher without one, the 4000
training MNIST digits (pixels; the held-out 1000 stay unseen). Units are shards of `data.shard_size` rows
written whole by one worker, with the runner's completion records, resume and `status --verify`; a shard's
bytes depend only on the config and the shard, so local, Ray and resumed runs give identical stores.
Resources per worker come from generate (cpus_per_worker, gpus_per_worker, max_retries).
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.latents import CAPTIONS, LATENT_STORE, LatentStore, latent_store_dir
from pipeline.runner import Job, Unit, drop_record, read_record
from pipeline.typed_arrays import shard_key

IMAGE_PATHS = "images.parquet"


def encode_meta(cfg, rows: int) -> dict[str, Any]:
    """What decides a latent store's contents (checked when it is reopened)."""
    return {"format": 1, "teacher": cfg.teacher.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
            "device": cfg.device.split(":")[0], "store_dtype": cfg.generate.store_dtype,
            "compressor": cfg.generate.compressor, "rows": rows, "fingerprint": cfg.fingerprint("encode")}


def count_rows(cfg) -> int:
    """Rows of the image set (cheap: a directory listing or one streamed pass over the captions)."""
    if cfg.data.images is None:
        from pipeline.digits import HELD_OUT

        return min(5000 - HELD_OUT, cfg.data.limit or 5000)
    out_dir = latent_store_dir(cfg)
    if (out_dir / CAPTIONS).is_file():                     # planned before: the copy is the source of truth
        from pipeline.datasets import TextColumn

        return len(TextColumn(out_dir / CAPTIONS))
    from pipeline.datasets import IMAGE_COLUMNS, folder_images, image_column_kind, pick_column, table_batches, \
        text_batches

    src = Path(cfg.data.images)
    if not src.exists():
        raise UserError(f"data.images not found: {src}")
    if src.is_dir() and not any((src / f).is_file() for f in ("state.json", "dataset_dict.json")):
        from pipeline.datasets import read_text

        images = folder_images(src)
        for p in images[:cfg.data.limit or None]:       # a caption that is not UTF-8 fails before anything is written
            read_text(p.with_suffix(".txt"))
        n = len(images)
    else:                       # check both columns now: a bad set fails before anything is written
        image_column_kind(src, pick_column(src, table_batches(src)[0], cfg.data.image_column, IMAGE_COLUMNS,
                                           "data.image_column"))
        n = sum(len(b) for b in text_batches(src, cfg.data.caption_column, "data.images", "data.caption_column"))
    return min(n, cfg.data.limit or n)


def jobs(cfg, **_) -> list[Job]:
    """One job, a unit per shard of the image set; none when there is no real image set."""
    out_dir = latent_store_dir(cfg)
    if out_dir is None:
        return []
    cfg = cfg.model_copy(update={"root": str(Path(cfg.root).absolute())})
    out_dir = latent_store_dir(cfg)
    rows = count_rows(cfg)
    if rows == 0:
        raise UserError("data.images has no rows")
    shard = min(cfg.data.shard_size, rows)
    units = [Unit(shard_key(j), {"shard": j, "start": lo, "stop": min(lo + shard, rows)}, min(lo + shard, rows) - lo)
             for j, lo in enumerate(range(0, rows, shard))]
    meta = encode_meta(cfg, rows)
    g = cfg.generate
    return [Job("encode", out_dir, units, functools.partial(EncodeWorker, cfg, meta),
                prepare=functools.partial(prepare_latents, cfg, meta, out_dir, [u.key for u in units], rows),
                num_cpus=g.cpus_per_worker, num_gpus=g.gpus_per_worker, max_retries=g.max_retries,
                item_name="images", ray_runner=run_with_ray_data)]


def prepare_latents(cfg, meta: dict, out_dir: Path, keys: list[str], rows: int) -> None:
    """Driver side: plan the rows (captions + image paths beside the store) and create the arrays from the
    teacher's layout, or check an existing store. Builds no model."""
    from pipeline.teachers import describe_teacher

    path = out_dir / LATENT_STORE
    if LatentStore.created(path):
        from pipeline.shard_check import redo_damaged

        redo_damaged(LatentStore.open(path, meta, check_complete=False), out_dir)   # redone, not skipped
        return
    for key in keys:
        drop_record(out_dir, key)
    layout = describe_teacher(cfg)
    if layout.image_shape is None:
        raise UserError(f"teacher.kind '{cfg.teacher.kind}' has no encode_images: it cannot encode data.images")
    if cfg.data.images is None:
        _plan_digits(out_dir, rows)
    else:
        from pipeline.datasets import copy_image_set

        out_dir.mkdir(parents=True, exist_ok=True)
        copy_image_set(cfg.data, out_dir / CAPTIONS, out_dir / IMAGE_PATHS)
    LatentStore.create(path, meta, rows, layout.sample_shape, layout.cond_shapes, cfg.data.shard_size,
                       cfg.generate.store_dtype, cfg.generate.compressor)


def _plan_digits(out_dir: Path, rows: int) -> None:
    import pyarrow as pa

    from pipeline.digits import load_digits, prompt_for
    from pipeline.files import atomic_write_parquet

    _, labels = load_digits()
    atomic_write_parquet(out_dir / CAPTIONS, pa.table({"text": [prompt_for(int(y)) for y in labels[:rows]]}))


class EncodeWorker:
    """Loads the teacher once (per process / Ray actor) and encodes whole shards."""

    def __init__(self, cfg, meta: dict):
        from pipeline.runner import torch_threads
        from pipeline.teachers import describe_teacher, load_teacher

        self.cfg, self.threads = cfg, cfg.generate.cpus_per_worker
        with torch_threads(self.threads):
            self.teacher = load_teacher(cfg)
        self.image_shape = describe_teacher(cfg).image_shape
        out_dir = latent_store_dir(cfg)
        self.store = LatentStore.open(out_dir / LATENT_STORE, meta, mode="r+", check_complete=False)
        self.out_dir = out_dir

    def images(self, lo: int, hi: int) -> torch.Tensor:
        """Pixels [n, C, H, W] in [-1, 1] of rows [lo, hi)."""
        if self.cfg.data.images is None:
            from pipeline.digits import load_digits

            return load_digits()[0][lo:hi]
        from pipeline.datasets import TextColumn, load_image, source_image_bytes

        paths = TextColumn(self.out_dir / IMAGE_PATHS).take(np.arange(lo, hi))
        if all(paths):
            sources = paths
        else:
            from pipeline.datasets import IMAGE_COLUMNS, pick_column, table_batches

            src = Path(self.cfg.data.images)
            col = pick_column(src, table_batches(src)[0], self.cfg.data.image_column, IMAGE_COLUMNS,
                              "data.image_column")
            sources = source_image_bytes(src, col, lo, hi)
        return torch.stack([load_image(s, self.image_shape, self.cfg.data.alpha_background) for s in sources])

    def run(self, unit: Unit) -> dict[str, Any]:
        from pipeline.runner import torch_threads

        lo, hi = unit.params["start"], unit.params["stop"]
        t0 = time.perf_counter()
        with torch_threads(self.threads), torch.no_grad():
            captions = self.store.captions(np.arange(lo, hi))
            uniq, inv = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
            enc = self.teacher.encode(list(uniq))
            cond = {k: v.float().cpu()[torch.as_tensor(inv.reshape(-1))] for k, v in enc.items()}
            null = {k: v.float().cpu() for k, v in self.teacher.encode([""]).items()}
            t1 = time.perf_counter()
            pixels = self.images(lo, hi)
            t2 = time.perf_counter()
            bs = self.cfg.data.batch_size
            latents = torch.cat([self.teacher.encode_images(pixels[b:b + bs]).float().cpu()
                                 for b in range(0, hi - lo, bs)])
        t3 = time.perf_counter()
        shard = unit.params["shard"]
        digest = self.store.write_shard(shard, latents, cond, null if shard == 0 else None)
        from pipeline.shard_check import shard_files

        return {"checksum": digest, "files": shard_files(self.store, shard), "images": hi - lo,
                "worker_pid": os.getpid(),
                "caption_seconds": round(t1 - t0, 4), "read_seconds": round(t2 - t1, 4),
                "vae_seconds": round(t3 - t2, 4),
                "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]}


class _ShardEncoder:
    """A Ray Data actor (one per GPU, or per `cpus_per_worker` CPUs): builds the worker once, then encodes
    whole shards, each committed with its completion record exactly as under the local executor."""

    def __init__(self, make_worker, out_dir: str):
        self.worker, self.out_dir = make_worker(), Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        import json

        from pipeline.runner import execute_unit

        states = [execute_unit(self.worker, self.out_dir, Unit(k, json.loads(p), int(n)))[0]
                  for k, p, n in zip(batch["key"], batch["params"], batch["size"])]
        return {"key": batch["key"], "state": np.asarray(states), "size": batch["size"]}


def run_with_ray_data(job: Job, pending: list[Unit], bar, address: str | None, workers: int | None) -> None:
    """`--executor ray`: the pending shards stream through a Ray Data `map_batches` actor pool (one actor per
    GPU with generate.gpus_per_worker: 1). Ray Data retries a task whose actor died; a shard whose record
    says done is never redone (the runner checks the records afterwards)."""
    import json

    import ray

    from pipeline.runner import _ray_init

    _ray_init(address)
    per = job.num_gpus or job.num_cpus
    avail = ray.cluster_resources().get("GPU" if job.num_gpus else "CPU", 1)
    n = max(1, min(len(pending), workers or int(avail // max(per, 1e-9)) or 1))
    ds = ray.data.from_items([{"key": u.key, "params": json.dumps(u.params), "size": u.size} for u in pending])
    ds = ds.map_batches(_ShardEncoder, fn_constructor_args=(job.make_worker, str(job.out_dir)), batch_size=1,
                        concurrency=n, num_cpus=job.num_cpus, num_gpus=job.num_gpus or None,
                        max_task_retries=job.max_retries)
    for row in ds.iter_rows():
        bar.update(int(row["size"]))


def verify_unit(job: Job, unit: Unit) -> str | None:
    """`status --verify`: a done shard must read back with the checksum its writer recorded."""
    rec = read_record(job.out_dir, unit.key)
    if not rec or rec.get("status") != "done":
        return None
    from pipeline.shard_check import shard_problem

    problem = shard_problem(job.out_dir / LATENT_STORE, rec.get("files") or {})
    if problem:
        return f"shard files damaged ({problem})"
    try:
        got = LatentStore.open(job.out_dir / LATENT_STORE, check_complete=False).shard_checksum(unit.params["shard"])
    except Exception as exc:  # unreadable metadata or a shard zarr cannot decode (e.g. truncated)
        return f"shard unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if got != rec.get("checksum"):
        return "shard checksum differs from its completion record (corrupt or overwritten)"
    return None
