"""The latent store: real images through the teacher's `encode_images`, with their captions' conditions.

Layout (`latent_store_dir(cfg) / "latents.zarr"`; N images, store dtype T = encode.store_dtype):
    latents        [N, C, H, W] T    teacher.encode_images(image): SD3 (VAE mean - shift) * scale;
                                     embedded: the [-1, 1] pixels themselves
    prompt_embeds  [N, L, D] T       the caption's teacher condition, one row per image
    pooled_embeds  [N, D'] T
    null_*         [1, ...] T        the "" condition (written by shard 0's unit)
    attrs          meta (what decides the store + fingerprint), sample_shape, shard_size, store_dtype
captions.parquet beside it holds row -> caption. Shards of `data.shard_size` rows are the units of
`flowsteer encode`, with the same completion records, resume and `status --verify` as trajectories.
Reader API (what training uses; values always float32): `LatentStore.open`, `num_samples`, `latents`,
`cond`, `null_cond`, `captions`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.row_arrays import create_rows
from pipeline.rowstore import RowStore

FORMAT = 1                        # meta["format"] of a latent store (bumped when its layout changes)
LATENT_STORE = "latents.zarr"
CAPTIONS = "captions.parquet"


def latent_store_dir(cfg) -> Path | None:
    """Where `flowsteer encode` writes; None when there is no real image set (no data.images, not embedded)."""
    if getattr(cfg, "data", None) is None or (cfg.data.images is None and cfg.teacher.kind != "embedded"):
        return None
    return cfg.stage_dir("encode")


class LatentStore(RowStore):
    """Reader (and per-shard writer) of one latent store."""

    kind = "latent store"
    file_name = LATENT_STORE
    command = "flowsteer encode"
    mismatch_fix = "run `flowsteer encode`"
    row_arrays = ("latents",)

    def __init__(self, group, path: Path):
        super().__init__(group, path)
        self._captions = None

    @classmethod
    def create(cls, path: Path, meta: dict, num_rows: int, sample_shape: Sequence[int],
               cond_shapes: dict[str, Sequence[int]], shard_size: int, store_dtype: str = "float32",
               compressor: str = "none", cond_extents: dict | None = None) -> "LatentStore":
        """Allocate every array; `meta` is written last (a store without it is an interrupted creation)."""
        import zarr

        path = Path(path)
        shard = max(1, min(shard_size, num_rows))
        with cls.build_aside(path) as tmp:  # built aside and renamed: an existing latents.zarr is whole
            g = zarr.open_group(str(tmp), mode="w")
            create_rows(g, "latents", num_rows, sample_shape, shard, store_dtype, compressor)
            names = cls.create_cond_arrays(g, num_rows, cond_shapes, shard, store_dtype, compressor, cond_extents)
            g.attrs.update({"sample_shape": [int(s) for s in sample_shape], "shard_size": shard,
                            "cond_arrays": names, "store_dtype": store_dtype, "num_rows": int(num_rows)})
            g.attrs["meta"] = meta
        return cls.open(path, mode="r+", check_complete=False)

    # ------------------------------------------------------------ writing (one unit = one shard)
    def write_shard(self, shard: int, latents, cond: dict[str, torch.Tensor],
                    null: dict[str, torch.Tensor] | None = None) -> str:
        """Write a shard's latents and conditions (shard 0 also the "" condition); returns its checksum."""
        return self.write_shard_data(shard, {"latents": latents}, cond, null)

    # ------------------------------------------------------------ reader API
    def latents(self, indices, stored: bool = False) -> np.ndarray | torch.Tensor:
        """[n, C, H, W] latents of rows `indices`: float32 (`stored`: a tensor in the store dtype)."""
        return self.rows("latents", indices, stored)

    def cond(self, indices, stored: bool = False) -> dict[str, torch.Tensor]:
        """Teacher conditions of the rows' captions (CPU; encoder_hidden_states, pooled_projections), float32
        or with `stored` the store dtype."""
        return self.row_cond(indices, stored)

    def captions(self, indices) -> list[str]:
        from pipeline.datasets import TextColumn

        if self._captions is None:
            self._captions = TextColumn(self.path.parent / CAPTIONS)
        return self._captions.take(indices)
