"""The batch loader (pipeline/loader.py): batch s is the same with 0, 1 or 4 worker processes or a prefetch
thread, drawn in any order; a dead or failing worker is an error naming the step; the compile and fused-AdamW
paths of pipeline/fast_step.py compute what the plain ones do."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import generated_toy, trainer_for, write_config
from pipeline.loader import BatchLoader, LoaderError
from schemas.config import load_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:This DataLoader will create")]     # 4 workers on 2 cores

TRAIN = {"steps": 6, "batch_size": 4, "online_fraction": 0.5, "adversarial": {"disc_blocks": 1}}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return generated_toy(tmp_path_factory, "loader", {"train": TRAIN})[2]


def same(a, b) -> bool:
    """Bit-identical nested batches (tensors compared exactly, dtype included)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("method", ["flowsteer", "perflow"])
def test_batch_of_each_step_is_identical_with_0_1_and_4_workers(toy_run, method):
    """flowsteer: cached segments, online noise, GAN rows; perflow: the store's samples at the real-data cursor."""
    runs = {}
    for workers, depth in ((0, 0), (0, 2), (1, 1), (4, 2)):
        trainer = trainer_for(toy_run, method, loader_workers=workers, prefetch=depth)
        runs[workers, depth] = [trainer.loader.next(s) for s in range(6)]
        trainer.close()
    first = runs[0, 0]
    assert len({float(b["z_start"].sum()) if "z_start" in b else float(b["x0"].sum()) for b in first}) == 6
    for key, batches in runs.items():
        assert all(same(a, b) for a, b in zip(first, batches)), key
    # a pure function of the step: drawn alone, out of order, in this process
    trainer = trainer_for(toy_run, method)
    assert same(trainer.loader.next(4), first[4]) and same(trainer.loader.next(5), first[5])
    assert same(trainer.loader.next(2), first[2])              # a step out of sequence restarts there
    trainer.close()


def test_real_rows_from_worker_arena_slots_stay_intact_while_held(toy_run, tmp_path):
    """PeRFlow's x0 and conditions read by 2 workers into their batch-arena slots (3 batches each, reused over
    8 steps) are, held all at once after `next`, the rows drawn in this process."""
    from conftest import deep_merge, toy_sections
    from test_precision import _write_latents

    sections = deep_merge(toy_sections(tmp_path), {"train": {**TRAIN, "method_options": {"perflow": {"x0": "real"}},
                                                             "store": str(toy_run.stage_dir("generate"))},
                                                   "data": {"images": str(tmp_path / "images")}})
    cfg = load_config(write_config(tmp_path / "real.yaml", **sections))
    _write_latents(cfg, n=10)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 8})})
    runs = {}
    for workers in (0, 2):
        trainer = trainer_for(cfg, "perflow", loader_workers=workers, prefetch=1)
        runs[workers] = [trainer.loader.next(s) for s in range(8)]
        trainer.close()
    assert all(same(a, b) for a, b in zip(runs[0], runs[2]))
    assert len({float(b["x0"].sum()) for b in runs[0]}) > 4
    assert all(float(b["x0"].min()) >= 0 for b in runs[0])           # the latent store's rows (i + 0.01 j)


def test_resumed_cursor_draws_the_uninterrupted_batches(toy_run):
    """A trainer loaded at step 3 with workers on draws steps 3.. exactly as the uninterrupted one."""
    whole = trainer_for(toy_run, "perflow", loader_workers=2)
    for _ in range(3):
        whole.train_step()
    state = {**whole.state_dict(), "step": whole.step}
    expected = [whole.loader.next(s) for s in (3, 4, 5)]
    whole.close()
    resumed = trainer_for(toy_run, "perflow", loader_workers=2)
    resumed.load_state_dict(state)
    assert all(same(resumed.loader.next(s), e) for s, e in zip((3, 4, 5), expected))
    resumed.close()


def _dies_at_two(step):
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"x": torch.full((2,), float(step))}


def _fails_at_three(step):
    if step == 3:
        raise ValueError("corrupt row 17")
    return {"x": torch.full((2,), float(step))}


def _user_error_at_one(step):
    from pipeline.errors import UserError

    if step == 1:
        raise UserError("latent store /x is incomplete; run `flowsteer encode`")
    return {"x": torch.zeros(1)}


def test_a_worker_that_dies_is_an_error_naming_the_step_not_a_hang():
    loader = BatchLoader(_dies_at_two, "cpu", workers=2, depth=1, last_step=6)
    t0 = time.monotonic()
    assert float(loader.next(0)["x"][0]) == 0
    with pytest.raises(LoaderError, match="worker 1 died while drawing the batch of step 3"):
        loader.next(1)                  # step 2 may still arrive first; the dead worker's step 3 never does
        loader.next(2)
    assert time.monotonic() - t0 < 60
    loader.close()


def test_a_worker_that_raises_is_an_error_naming_the_step():
    loader = BatchLoader(_fails_at_three, "cpu", workers=1, depth=2, last_step=6)
    for s in range(3):
        loader.next(s)
    with pytest.raises(LoaderError, match=r"batch of step 4 \(ValueError: corrupt row 17\)"):
        loader.next(3)
    loader.close()
    from pipeline.errors import UserError

    loader = BatchLoader(_user_error_at_one, "cpu", workers=1, depth=1, last_step=6)
    loader.next(0)
    with pytest.raises(UserError) as err:                  # still the one readable line of a user error
        loader.next(1)
    assert str(err.value) == "step 2: latent store /x is incomplete; run `flowsteer encode`"
    loader.close()


def _mixed_rows(step):
    """Rows of every kind a draw returns: read into the arena (`empty`), made fresh, a view, bf16, bool; from
    step 3 on a tensor bigger than step 0's whole batch (sized the arena), which cannot fit its slot."""
    from pipeline.shard_reader import empty

    g = torch.Generator().manual_seed(step)
    read = empty((4, 8), torch.float16)
    read.copy_(torch.randn(4, 8, generator=g))
    fresh = torch.randn(6, 3, generator=g)
    rows = {"read": read, "fresh": fresh, "strided": fresh.t(), "bf16": fresh.bfloat16(), "mask": fresh > 0,
            "k": torch.arange(step, step + 3), "nested": {"empty": torch.zeros(0, 5), "step": step}}
    if step >= 3:
        rows["big"] = torch.randn(300_000, generator=g)
    return rows


def test_worker_batches_arrive_through_the_arena_intact_and_one_too_big_still_arrives(monkeypatch):
    """What crosses from workers is a few offsets into the shared arena (no tensor but one that cannot fit);
    every batch equals the one drawn in this process, held all at once after `next`."""
    from pipeline.batch_arena import ArenaRef, BatchArena

    sent = []
    unpack = BatchArena.unpack
    def recorded(self, tree):
        if isinstance(tree, dict) and "read" in tree:       # a whole batch (unpack recurses into its parts)
            sent.append(tree)
        return unpack(self, tree)

    monkeypatch.setattr(BatchArena, "unpack", recorded)
    loader = BatchLoader(_mixed_rows, "cpu", workers=2, depth=1, last_step=6)
    got = [loader.next(s) for s in range(6)]
    loader.close()
    assert all(same(g, to_cpu(_mixed_rows(s))) for s, g in enumerate(got))
    assert [tree["nested"]["step"] for tree in sent] == [1, 2, 3, 4, 5]       # step 0: drawn here, sizes the arena
    assert all(isinstance(tree[k], ArenaRef) for tree in sent for k in ("read", "fresh", "strided", "bf16", "k"))
    assert all(isinstance(tree["big"], torch.Tensor) for tree in sent[2:])


def _arena_view_outgrowing_its_slot(step):
    """A non-contiguous view of rows read into the arena; from step 2 on the rows are 1.21x as big, so they still
    fit the slot step 0 sized but the view's contiguous copy no longer does."""
    from pipeline.shard_reader import empty

    n = 400 if step < 2 else 440
    x = empty((n, n))
    x.copy_(torch.arange(n * n, dtype=torch.float32).reshape(n, n) + step)
    return {"t": x.t(), "k": torch.full((4,), step)}


def test_a_view_of_the_arena_that_cannot_be_copied_into_its_slot_still_arrives_whole():
    """(Sent torch's usual way, a view of the arena would move the worker's whole arena to new memory: every
    later batch would read stale rows.) Every batch equals the one drawn in this process."""
    loader = BatchLoader(_arena_view_outgrowing_its_slot, "cpu", workers=1, depth=1, last_step=7)
    got = [loader.next(s) for s in range(7)]
    loader.close()
    assert all(same(g, _arena_view_outgrowing_its_slot(s)) for s, g in enumerate(got))


def to_cpu(tree):
    """A draw's rows as `next` hands them out on the CPU: floating tensors as float32."""
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    return tree.float() if isinstance(tree, torch.Tensor) and tree.is_floating_point() else tree


# ---------------------------------------------------------------- reads (pipeline/shard_reader.py)
@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16", "float32"])
def test_rows_read_from_shard_files_equal_zarrs_reads(tmp_path, store_dtype):
    """Rows as stored, read straight from the shard files (any order, repeats, a shard never written = the fill
    value), are zarr's rows; a compressed array is not read that way."""
    import numpy as np
    import zarr

    from pipeline.shard_reader import ShardRows
    from pipeline.row_arrays import create_rows, decode, encode, write_shard_rows
    from pipeline.rowstore import RowStore

    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    create_rows(g, "x", 10, (3, 5), 4, store_dtype, "none")
    create_rows(g, "z", 10, (3, 5), 4, store_dtype, "zstd")
    data = torch.randn(10, 3, 5)
    for name in ("x", "z"):
        for shard, (lo, hi) in enumerate([(0, 4), (4, 8)]):            # rows 8, 9 (shard 2) never written
            write_shard_rows(tmp_path / "s.zarr", g[name], shard, lo, encode(data[lo:hi], store_dtype))
    assert ShardRows.of(g["x"]) is not None and ShardRows.of(g["z"]) is None
    g.attrs.update({"meta": {}, "sample_shape": [3, 5], "shard_size": 4, "cond_arrays": {}, "num_rows": 10,
                    "store_dtype": store_dtype})
    store = RowStore(g, tmp_path / "s.zarr")
    rows = [9, 2, 7, 2, 0, 5, 8]
    expected = decode(np.asarray(g["x"][:]), store_dtype)[rows]
    assert not expected[[0, 6]].any()                                   # the fill value
    # rows chunked past a non-zero extent (rowstore.row_chunk): zeros there are not written, yet a row that is
    # not zero there (row 7) reads back whole: the layout is lossless
    create_rows(g, "e", 10, (3, 5), 4, store_dtype, "none", extent=(1, 5))
    padded = data.clone()
    padded[:, 1:] = 0
    padded[7, 2, 4] = 3.0
    for shard, (lo, hi) in enumerate([(0, 4), (4, 8)]):
        write_shard_rows(tmp_path / "s.zarr", g["e"], shard, lo, encode(padded[lo:hi], store_dtype))
    assert ShardRows.of(g["e"]).per_row == 3
    padded_rows = decode(np.asarray(g["e"][:]), store_dtype)[rows]
    assert padded_rows[:, 1:].any()
    for name in ("x", "z"):
        got = store.rows(name, rows, stored=True)
        assert got.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[store_dtype]
        assert torch.equal(got.float(), torch.from_numpy(expected)), name
        assert np.array_equal(store.rows(name, rows), expected)
    got = store.rows("e", rows, stored=True)
    assert torch.equal(got.float(), torch.from_numpy(padded_rows))


def test_segments_of_a_store_bigger_than_its_cache_are_read_edge_by_edge_from_the_files(toy_run):
    """A store that does not fit its shard cache reads each row's two edges straight from the shard files:
    the same segments as the cached whole shards."""
    import numpy as np

    from pipeline.store import TrajectoryStore

    path = toy_run.stage_dir("generate")
    cached, direct = TrajectoryStore.open(path), TrajectoryStore.open(path, cache_bytes=1)
    assert cached._cache_shards and not direct._cache_shards
    idx, ks = np.array([5, 0, 5, 3, 4, 1]), np.array([3, 0, 1, 2, 0, 3])
    for a, b in zip(cached.segments(idx, ks), direct.segments(idx, ks)):
        assert np.array_equal(a, b)
    assert not direct._cache                                  # nothing cached


# ---------------------------------------------------------------- a faster step (pipeline/fast_step.py)
def test_fused_adamw_takes_the_foreach_steps():
    from pipeline.fast_step import adamw

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [adamw(nets[0].parameters(), 1e-2, 0.01, "cpu", fused=False),
            adamw(nets[1].parameters(), 1e-2, 0.01, "cpu", fused=True)]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    for step in range(5):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(nets[0][0].weight, torch.nn.Linear(8, 16).weight)


def test_compiled_student_trains_as_the_eager_one_and_its_copies_run_their_own_weights(toy_run):
    """train.compile (each block compiled in place): losses within float tolerance of eager over 3 steps,
    the same state-dict keys, and the EMA copy is an eager module with the EMA weights."""
    from pipeline.fast_step import plain_copy

    runs = {}
    for compiled in (False, True):
        trainer = trainer_for(toy_run, "ota", compile=compiled, prefetch=0)
        runs[compiled] = ([trainer.train_step()["loss"] for _ in range(3)], trainer)
    (eager, te), (comp, tc) = runs[False], runs[True]
    assert tc.student.transformer_blocks[0]._compiled_call_impl is not None
    assert te.student.state_dict().keys() == tc.student.state_dict().keys()
    assert comp == pytest.approx(eager, rel=1e-4, abs=1e-6)
    ema = tc.ema_student()
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in ema.modules())
    copy = plain_copy(tc.student)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    x = torch.randn(2, 1, 8, 8)
    cond = te.solves.null_cond(2)
    args = dict(hidden_states=x, timestep=torch.ones(2), encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        assert not torch.equal(copy(**args)[0], tc.student(**args)[0])     # the copy runs its own (zero) weights
    te.close()
    tc.close()


def test_gradient_checkpointing_trains_the_same_steps(toy_run):
    """train.gradient_checkpointing recomputes the blocks' activations in backward: the same losses and weights."""
    runs = {}
    for ckpt in (False, True):
        trainer = trainer_for(toy_run, "ota", gradient_checkpointing=ckpt, prefetch=0)
        runs[ckpt] = ([trainer.train_step()["loss"] for _ in range(3)], trainer.student.state_dict())
        assert trainer.student.gradient_checkpointing is ckpt
        trainer.close()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=1e-9)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-5, atol=1e-7)


def test_exact_teachers_real_rows_are_drawn_in_workers_and_sampled_in_the_step(tmp_path):
    """The exact teacher's data has no files: a worker draws prompts and a seed, the training process samples x0
    from the teacher's data law and encodes the prompts; the same batches with 0 and 2 workers."""
    from pipeline.runner import run_job
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from schemas.config import RunConfig
    from stages import teacher as teacher_stage

    cfg = RunConfig.model_validate({"root": str(tmp_path), "teacher": {"kind": "exact", "exact": {
        "train_steps": 10, "weak_checkpoint_step": 5, "num_layers": 1, "batch_size": 8}},
        "schedule": {"teacher_steps": 8, "windows": 4}, "train": {"batch_size": 4, "steps": 4}})
    for job in teacher_stage.jobs(cfg):
        run_job(job, "local")
    teacher = load_teacher(cfg)
    batches = {}
    for workers in (0, 2):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loader_workers": workers})})
        trainer = Trainer(c, "perflow", teacher, None, "cpu")
        batches[workers] = [trainer.method.complete(trainer.loader.next(s)) for s in range(3)]
        assert np.isfinite(trainer.train_step()["loss"]) if workers == 0 else True
        trainer.close()
    for a, b in zip(batches[0], batches[2]):
        assert same(a, b)
    x0 = batches[0][0]["z_start"]
    assert x0.shape == (4, *teacher.sample_shape) and len({float(b["z_start"].sum()) for b in batches[0]}) == 3
