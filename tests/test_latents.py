"""Latent store: layout, typed rows, reader API (latents, cond, null_cond, captions), completion checks."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write_parquet
from pipeline.latents import CAPTIONS, LatentStore
from pipeline.runner import write_record
from pipeline.rowstore import shard_key

N, SHAPE, SHARD = 7, (2, 4, 4), 3
COND = {"encoder_hidden_states": (3, 5), "pooled_projections": (5,)}


def make_latent_store(tmp_path, store_dtype="float32", done=True):
    """A latent store whose row i holds latents (i + arange / 4) / 3 (not exact in 16 bits), conditions i - 0.5."""
    path = tmp_path / "encode" / "latents.zarr"
    captions = [f"caption {i}" for i in range(N)]
    atomic_write_parquet(path.parent / CAPTIONS, pa.table({"text": captions}))
    store = LatentStore.create(path, {"format": 1, "kind": "test"}, N, SHAPE, COND, SHARD, store_dtype)
    lat = ((np.arange(N)[:, None] + 0.25 * np.arange(int(np.prod(SHAPE)))[None]) / 3).reshape(N, *SHAPE)
    lat = lat.astype(np.float32)
    cond = {k: torch.arange(N, dtype=torch.float32).reshape(N, *[1] * len(s)).expand(N, *s) - 0.5
            for k, s in COND.items()}
    null = {k: torch.full((1, *s), -3.0) for k, s in COND.items()}
    for j in range(store.num_shards):
        lo, hi = store.shard_range(j)
        digest = store.write_shard(j, lat[lo:hi], {k: v[lo:hi] for k, v in cond.items()}, null if j == 0 else None)
        if done:
            write_record(path.parent, shard_key(j), "done", checksum=digest)
    return path, lat, cond, captions


@pytest.mark.parametrize("store_dtype", ["float32", "float16", "bfloat16"])
def test_reader_api_returns_float32_rows(tmp_path, store_dtype):
    path, lat, cond, captions = make_latent_store(tmp_path, store_dtype)
    st = LatentStore.open(path.parent)                      # the encode dir works too
    assert st.num_samples == N and st.sample_shape == SHAPE and st.num_shards == 3
    idx = np.array([6, 0, 3, 3])
    got = st.latents(idx)
    assert got.dtype == np.float32 and got.shape == (4, *SHAPE)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[store_dtype]
    assert np.allclose(got, lat[idx], rtol=tol, atol=0) and (tol == 0) == np.array_equal(got, lat[idx])
    c = st.cond(idx)
    assert set(c) == set(COND) and all(v.dtype == torch.float32 for v in c.values())
    assert torch.equal(c["pooled_projections"][:, 0], torch.tensor([5.5, -0.5, 2.5, 2.5]))
    n = st.null_cond(2)
    assert n["encoder_hidden_states"].shape == (2, 3, 5) and (n["encoder_hidden_states"] == -3).all()
    assert st.captions([4, 1]) == ["caption 4", "caption 1"]
    with pytest.raises(IndexError):
        st.latents([N])
    # One shard file per shard for every row array; the on-disk dtype is the store dtype (bf16 as raw uint16).
    assert len([p for p in (path / "latents" / "c").rglob("*") if p.is_file()]) == 3
    assert str(st.group["latents"].dtype) == {"bfloat16": "uint16"}.get(store_dtype, store_dtype)
    assert st.shard_checksum(1) and st.shard_checksum(0) != st.shard_checksum(1)


def test_incomplete_or_missing_store_is_refused(tmp_path):
    path, *_ = make_latent_store(tmp_path, done=False)
    with pytest.raises(UserError, match="incomplete.*3 of 3 shards"):
        LatentStore.open(path)
    assert LatentStore.open(path, check_complete=False).num_samples == N
    with pytest.raises(UserError, match="no latent store.*flowsteer encode"):
        LatentStore.open(tmp_path / "nowhere")
    with pytest.raises(UserError, match="another config"):
        LatentStore.open(path, {"format": 1, "kind": "other"}, check_complete=False)
