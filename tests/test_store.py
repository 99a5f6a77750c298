"""Trajectory store: layout, reader API (random segments, shard iterator, conditions), meta checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.runner import write_record
from pipeline.row_arrays import decode
from pipeline.rowstore import meta_differences, shard_key
from pipeline.seeds import guidance_for, noise_for, sample_seeds
from pipeline.store import TrajectoryStore, store_meta
from schemas.config import load_config

S, K, M, SHAPE, SHARD = 10, 4, 8, (1, 4, 4), 4


def make_store(tmp_path, steps=False, done=True):
    """A store filled with known values: states[i, k] = i * 100 + k everywhere."""
    seeds = sample_seeds(7, S)
    plan = {"seed": seeds, "prompt_index": np.arange(S) % 3, "guidance": guidance_for(seeds, 2.0, 4.0)}
    cond = {"encoder_hidden_states": torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5),
            "pooled_projections": torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5) + 0.5}
    null = {k: torch.full_like(v[:1], -1.0) for k, v in cond.items()}
    meta = {"format": 1, "schedule": {"teacher_steps": M, "windows": K}, "teacher": {"kind": "byo"}}
    path = tmp_path / "gen" / "store.zarr"
    store = TrajectoryStore.create(path, meta, ["a", "b", "c"], SHAPE, SHARD, M, K, plan, cond, null,
                                   record_every_step=steps)
    value = (np.arange(S)[:, None] * 100 + np.arange(K + 1)[None, :]).astype(np.float32)
    full = np.broadcast_to(value[:, :, None, None, None], (S, K + 1, *SHAPE)).copy()
    for j in range(store.num_shards):
        lo, hi = store.shard_range(j)
        st = np.broadcast_to(full[lo:hi, :1], (hi - lo, M + 1, *SHAPE)) if steps else None
        digest = store.write_shard(j, full[lo:hi], st)
        if done:
            write_record(path.parent, shard_key(j), "done", checksum=digest)
    return path, meta, full, cond


def test_noise_is_a_function_of_the_seed_alone():
    a = noise_for(123, (1, 4, 4))
    assert torch.equal(a, noise_for(123, (1, 4, 4)))
    assert not torch.equal(a, noise_for(124, (1, 4, 4)))
    batch = noise_for([5, 123], (1, 4, 4))
    assert batch.shape == (2, 1, 4, 4) and torch.equal(batch[1], a)
    seeds = sample_seeds(0, 50)
    assert len(set(seeds.tolist())) == 50 and seeds.min() > 1000     # far from small evaluation seeds
    assert np.array_equal(seeds, sample_seeds(0, 50)) and not np.array_equal(seeds, sample_seeds(1, 50))
    w = guidance_for(seeds, 3.0, 5.0)
    assert w.min() >= 3.0 and w.max() <= 5.0 and w.std() > 0.1


def test_layout_is_preallocated_and_sharded(tmp_path):
    path, _, _, _ = make_store(tmp_path, steps=True)
    st = TrajectoryStore.open(path)
    assert st.states.shape == (S, K + 1, *SHAPE) and st.steps.shape == (S, M + 1, *SHAPE)
    assert st.states.shards == (SHARD, K + 1, *SHAPE) and st.states.chunks == (1, K + 1, *SHAPE)
    assert st.num_shards == 3 and st.shard_range(2) == (8, 10)
    # One shard file per shard: three writers never share a file.
    files = sorted(p.name for p in (path / "states" / "c").rglob("*") if p.is_file())
    assert len(files) == 3


@pytest.mark.parametrize("cache_bytes", [256 << 20, 0])
def test_segments_random_access(tmp_path, cache_bytes):
    path, _, full, _ = make_store(tmp_path)
    st = TrajectoryStore.open(path, cache_bytes=cache_bytes)
    idx, ks = np.array([9, 0, 5, 5, 3]), np.array([3, 0, 1, 2, 3])
    z0, z1 = st.segments(idx, ks)
    assert np.array_equal(z0, full[idx, ks]) and np.array_equal(z1, full[idx, ks + 1])
    a, b = st.segment(7, 2)
    assert a.shape == SHAPE and a[0, 0, 0] == 702 and b[0, 0, 0] == 703
    with pytest.raises(IndexError):
        st.segments([0], [K])                    # window K would need edge K + 1


def test_shards_in_order_and_cond(tmp_path):
    path, _, full, cond = make_store(tmp_path)
    st = TrajectoryStore.open(path)
    ranges = [st.shard_range(j) for j in range(st.num_shards)]
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert np.array_equal(np.concatenate([decode(np.asarray(st.states[lo:hi]), st.store_dtype) for lo, hi in ranges]),
                          full)
    assert np.array_equal(st.prompt_index, np.arange(S) % 3)
    c = st.cond(np.array([2, 0, 2]))
    assert torch.equal(c["encoder_hidden_states"], cond["encoder_hidden_states"][[2, 0, 2]])
    assert torch.equal(c["pooled_projections"], cond["pooled_projections"][[2, 0, 2]])
    n = st.null_cond(3)
    assert n["pooled_projections"].shape == (3, 5) and (n["pooled_projections"] == -1).all()


def test_open_refuses_other_config_missing_and_incomplete(tmp_path):
    path, meta, _, _ = make_store(tmp_path)
    other = {**meta, "schedule": {"teacher_steps": 16, "windows": K}}
    with pytest.raises(UserError, match=r"another config.*schedule.teacher_steps: store 8, config 16"):
        TrajectoryStore.open(path, other)
    assert TrajectoryStore.open(path.parent, meta).num_samples == S     # the generate dir works too
    with pytest.raises(UserError, match="no trajectory store"):
        TrajectoryStore.open(tmp_path / "nowhere")
    path2, meta2, _, _ = make_store(tmp_path / "b", done=False)
    with pytest.raises(UserError, match=r"incomplete \(3 of 3 shards"):
        TrajectoryStore.open(path2, meta2)


def test_interrupted_creation_is_not_a_store_and_nothing_is_deleted_on_doubt(tmp_path, monkeypatch):
    import zarr

    path = tmp_path / "store.zarr"

    def killed(*a, **k):                      # creation dies after some arrays were written
        raise KeyboardInterrupt
    monkeypatch.setattr(TrajectoryStore, "_allocate",
                        lambda g, *a, **k: (g.create_array("states", shape=(2, 2), dtype="float32"), killed()))
    with pytest.raises(KeyboardInterrupt):
        TrajectoryStore.create(path, {}, 0, (1,), 1, 1, 1, {"seed": [0]})
    assert not path.exists() and not list(tmp_path.iterdir())   # built aside: nothing left, no half store
    assert not TrajectoryStore.created(path)
    with pytest.raises(UserError, match="no trajectory store"):
        TrajectoryStore.open(path)
    # A directory without the `meta` attribute is not silently treated as absent (and rebuilt over).
    zarr.open_group(str(path), mode="w").create_array("states", shape=(2, 2), dtype="float32")
    with pytest.raises(UserError, match=r"no 'meta'.*--rebuild"):
        TrajectoryStore.created(path)


def test_meta_follows_what_decides_the_store(make_toy_config, tmp_path):
    base = load_config(make_toy_config())
    m1 = store_meta(base)
    assert store_meta(load_config(make_toy_config("b.yaml", generate={"batch_size": 1}))) == m1
    shifted = store_meta(load_config(make_toy_config("c.yaml", schedule={"shift": 1.0})))
    assert meta_differences(m1, shifted) == ["schedule.shift: store 3.0, config 1.0"]
    # Same prompts path, new contents: the prompts hash catches it.
    (tmp_path / "prompts.txt").write_text("something else\n")
    assert [d.split(":")[0] for d in meta_differences(m1, store_meta(base))] == ["prompts_sha256"]
