"""Encode stage: real images through the teacher's `encode_images`, captions through its prompt encoder,
into the latent store (pipeline/latents.py; docs/store.md).

Sources: `data.images` (an image folder with a .txt caption per image, or Parquet / JSONL / HF datasets
rows with an image path or bytes and a caption) or, for the embedded teacher without one, the 4000
training MNIST digits (pixels; the held-out 1000 stay unseen): the one real-data source training reads.
Units are shards of `data.shard_size` rows written whole by one worker, with the runner's completion
records, resume and `status --verify`; a shard's bytes depend only on the config and the shard, so local,
Ray and resumed runs give identical stores. Store dtype, compressor and worker resources: `encode.*`.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.datasets import rows_hash
from pipeline.errors import UserError
from pipeline.latents import CAPTIONS, FORMAT, LATENT_STORE, LatentStore, latent_store_dir
from pipeline.runner import Job, Unit, drop_record, torch_threads
from pipeline.shard_stage import ShardWorker, absolute_root, shard_job, shard_units, verify_shard

IMAGE_PATHS = "images.parquet"


def encode_meta(cfg, rows: int) -> dict[str, Any]:
    """What decides a latent store's contents (checked when it is reopened)."""
    return {"format": FORMAT, "teacher": cfg.teacher.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
            "device": cfg.device.split(":")[0], "store_dtype": cfg.encode.store_dtype,
            "compressor": cfg.encode.compressor, "rows": rows, "fingerprint": cfg.fingerprint("encode")}


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
    cfg = absolute_root(cfg)
    out_dir = latent_store_dir(cfg)
    rows = count_rows(cfg)
    if rows == 0:
        raise UserError("data.images has no rows")
    units = shard_units(rows, cfg.data.shard_size)
    meta = encode_meta(cfg, rows)
    return [shard_job("encode", out_dir, units, functools.partial(EncodeWorker, cfg, meta),
                      functools.partial(prepare_latents, cfg, meta, out_dir, [u.key for u in units], rows),
                      cfg.encode, "images")]


def prepare_latents(cfg, meta: dict, out_dir: Path, keys: list[str], rows: int) -> None:
    """Driver side: plan the rows (captions + image paths beside the store) and create the arrays from the
    teacher's layout, or check an existing store. Builds no model."""
    from pipeline.teachers import describe_teacher

    path = out_dir / LATENT_STORE
    if LatentStore.created(path):
        from pipeline.rowstore import shard_key
        from pipeline.shard_check import redo_damaged

        redo_damaged(LatentStore.open(path, meta, check_complete=False), out_dir, shard_key)   # redone, not skipped
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
                       cfg.encode.store_dtype, cfg.encode.compressor, layout.cond_extents)


def _plan_digits(out_dir: Path, rows: int) -> None:
    import pyarrow as pa

    from pipeline.digits import load_digits, prompt_for
    from pipeline.files import atomic_write_parquet

    _, labels = load_digits()
    atomic_write_parquet(out_dir / CAPTIONS, pa.table({"text": [prompt_for(int(y)) for y in labels[:rows]]}))


class EncodeWorker(ShardWorker):
    """Encodes whole shards of the image set into the latent store."""

    store_cls = LatentStore

    def __init__(self, cfg, meta: dict):
        from pipeline.teachers import describe_teacher

        self.out_dir = latent_store_dir(cfg)
        super().__init__(cfg, meta, self.out_dir, cfg.encode)
        self.image_shape = describe_teacher(cfg).image_shape

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
                "vae_seconds": round(t3 - t2, 4), "captions_sha256": rows_hash([captions])[1]}


def verify_unit(job: Job, unit: Unit) -> str | None:
    """`status --verify`: a done shard must read back with the checksum its writer recorded."""
    return verify_shard(job, unit, LatentStore)
