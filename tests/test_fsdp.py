"""Sharded full students (train.sharding: fsdp, docs/students.md): torch 2.14's FSDP2 (`fully_shard` per SD3
block) on the CPU with gloo, two ranks. First the pieces alone (per-block sharding, a sharded
`torch.distributed.checkpoint` save that resumes exactly, a full state dict gathered into a plain diffusers
model), then the Trainer under fsdp against DDP on the same rows, exact resume and the gathered export."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _student():
    from pipeline.teachers.toy import make_toy_transformer

    return make_toy_transformer(layers=3, seed=0).float().train().requires_grad_(True)


def _loss(net, rank: int, step: int) -> torch.Tensor:
    from pipeline.teachers.base import sd3_velocity
    from pipeline.teachers.toy import _hash_encoder

    g = torch.Generator().manual_seed(100 * step + rank)               # each rank its own rows
    x, sigma = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g)
    return sd3_velocity(net, x, sigma, _hash_encoder(["a", "b"])).square().mean()


def _step(net, opt, rank: int, step: int) -> float:
    loss = _loss(net, rank, step)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def sharded():
        net = _student()
        for block in net.transformer_blocks:
            fully_shard(block)
        fully_shard(net)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    try:
        net, opt = sharded()
        for step in (1, 2):
            _step(net, opt, rank, step)
        model_sd, optim_sd = get_state_dict(net, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{out}/ckpt")
        whole = _step(net, opt, rank, 3)
        resumed, opt2 = sharded()
        model_sd, optim_sd = get_state_dict(resumed, opt2)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=f"{out}/ckpt")
        set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        again = _step(resumed, opt2, rank, 3)
        full = get_model_state_dict(resumed, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        local = sum(p.to_local().numel() for p in resumed.parameters())
        with torch.no_grad():
            sharded_out = _loss(resumed, 0, 9)
        if rank == 0:
            torch.save({"whole": whole, "again": again, "full": full, "local": local, "out": sharded_out},
                       f"{out}/result.pt")
        dist.barrier()                    # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()


def test_fully_shard_per_block_on_cpu_resumes_exactly_and_gathers_a_plain_model(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, 29900 + os.getpid() % 90, str(tmp_path)), nprocs=2)
    r = torch.load(tmp_path / "result.pt", weights_only=False)
    assert r["whole"] == r["again"]                                   # sharded checkpoint: exact resume
    plain = _student()
    total = sum(p.numel() for p in plain.parameters())
    assert r["local"] < total                                         # each rank holds a shard
    plain.load_state_dict(r["full"])                                  # gathered: a plain diffusers model
    with torch.no_grad():
        assert torch.allclose(_loss(plain, 0, 9), r["out"], atol=1e-6)


# ---------------------------------------------------------------- train.sharding: fsdp inside the Trainer
def _through_file(state: dict) -> dict:
    """A checkpoint as `save_checkpoint` writes it and the next run reads it (no tensor shared with the trainer)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _trainer_rank(rank: int, world: int, store_dir: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.sharding import local
    from pipeline.store import TrajectoryStore
    from pipeline.teachers.toy import make_toy_teacher
    from pipeline.trainer import Trainer
    from test_scflow import toy_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def trainer(sharding: str) -> Trainer:
        cfg = toy_cfg(lr=1e-2, prefetch=0, batch_size=4, workers=world, sharding=sharding)
        store = TrajectoryStore.open(store_dir, check_complete=False)
        return Trainer(cfg, "flowsteer", make_toy_teacher("cpu"), store, "cpu", rank=rank, world=world)

    try:
        runs = {}
        for sharding in ("ddp", "fsdp"):               # the same rows per rank in both
            t = trainer(sharding)
            for _ in range(2):
                t.train_step()
            saved = _through_file({**t.state_dict(), "step": t.step})  # collective: whole tensors on every rank
            t.train_step()
            runs[sharding] = {**_through_file(t.state_dict()), "step": t.step, "finite": t.weights_finite(),
                              "local": sum(local(p).numel() for p in t.student.parameters())}
            t.close()
        resumed = trainer("fsdp")
        resumed.load_state_dict(saved)                  # the fsdp run's step-2 checkpoint
        resumed.train_step()
        again = _through_file(resumed.state_dict())
        ema_net = resumed.ema_student().state_dict()    # collective under fsdp
        resumed.close()
        if rank == 0:
            torch.save({"runs": runs, "again": again, "ema_net": ema_net}, f"{out}/trainer.pt")
        dist.barrier()                    # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()


def test_train_sharding_fsdp_matches_ddp_resumes_exactly_and_exports_one_directory(tmp_path):
    import torch.multiprocessing as mp

    from pipeline.export import export_student
    from pipeline.store import TrajectoryStore
    from pipeline.student import load_student
    from pipeline.teachers.toy import make_toy_teacher
    from pipeline.trainer import Trainer
    from test_scflow import build_store, toy_cfg

    build_store(tmp_path, toy_cfg(), make_toy_teacher("cpu"))
    mp.spawn(_trainer_rank, args=(2, str(tmp_path / "store.zarr"), 29700 + os.getpid() % 200, str(tmp_path)),
             nprocs=2)
    r = torch.load(tmp_path / "trainer.pt", weights_only=False)
    ddp, fsdp = r["runs"]["ddp"], r["runs"]["fsdp"]
    initial = make_toy_teacher("cpu").transformer.state_dict()
    assert fsdp["finite"] and fsdp["local"] < sum(v.numel() for v in initial.values())   # each rank a shard
    assert set(fsdp["student"]) == set(ddp["student"])            # the checkpoint format is DDP's
    assert any(not torch.equal(v, initial[k]) for k, v in fsdp["student"].items()), "the student trained"
    for part in ("student", "ema"):                                # same rows: DDP's result up to float sums
        for k, v in ddp[part].items():
            assert torch.allclose(fsdp[part][k], v, atol=1e-5, rtol=1e-4), (part, k)
    for i, moments in ddp["opt"]["state"].items():
        for k, v in moments.items():
            assert torch.allclose(fsdp["opt"]["state"][i][k], v, atol=1e-6, rtol=1e-4), (i, k)
    for part in ("student", "ema"):                                # resumed from step 2: exact
        for k, v in fsdp[part].items():
            assert torch.equal(r["again"][part][k], v), (part, k)
    for i, moments in fsdp["opt"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(r["again"]["opt"]["state"][i][k], v), (i, k)
    # export: the train stage rebuilds one rank from the checkpoint and writes one diffusers directory
    cfg = toy_cfg(lr=1e-2, prefetch=0, batch_size=4)
    one = Trainer(cfg, "flowsteer", make_toy_teacher("cpu"), TrajectoryStore.open(tmp_path / "store.zarr",
                                                                                  check_complete=False), "cpu")
    one.load_state_dict(fsdp)
    net = one.ema_student()
    one.close()
    for k, v in r["ema_net"].items():                              # the gathered EMA copy on the ranks: the same
        assert torch.equal(net.state_dict()[k], v), k
    path = export_student(tmp_path / "export", "flowsteer", net, cfg, make_toy_teacher("cpu").sample_shape)
    loaded = load_student(path)
    for k, v in loaded.module.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def _methods_rank(rank: int, world: int, store_dir: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.store import TrajectoryStore
    from pipeline.teachers.toy import make_toy_teacher
    from pipeline.trainer import Trainer
    from test_scflow import toy_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        states = {}
        for method in ("perflow", "ota", "ayf-emd"):
            cfg = toy_cfg(lr=1e-2, prefetch=0, batch_size=4, workers=world, sharding="fsdp", methods=[method],
                          method_options={"perflow": {"x0": "teacher_samples"}} if method == "perflow" else {})
            t = Trainer(cfg, method, make_toy_teacher("cpu"), TrajectoryStore.open(store_dir, check_complete=False),
                        "cpu", rank=rank, world=world)
            for _ in range(2):
                t.train_step()
            states[method] = {"finite": t.weights_finite(), "student": t.state_dict()["student"]}
            t.close()
        torch.save(states, f"{out}/methods{rank}.pt")
        dist.barrier()                    # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()


def test_the_other_sharding_methods_train_under_fsdp(tmp_path):
    """perflow, ota and Align Your Flow (flowsteer: above) train sharded; scflow is refused at load
    (tests/test_bad_configs.py)."""
    import torch.multiprocessing as mp

    from pipeline.teachers.toy import make_toy_teacher
    from test_scflow import build_store, toy_cfg

    build_store(tmp_path, toy_cfg(), make_toy_teacher("cpu"))
    mp.spawn(_methods_rank, args=(2, str(tmp_path / "store.zarr"), 29500 + os.getpid() % 100, str(tmp_path)),
             nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"methods{r}.pt", weights_only=False) for r in (0, 1))
    initial = make_toy_teacher("cpu").transformer.state_dict()
    for method, state in r0.items():
        assert state["finite"], method
        pairs = [(v, initial[ik]) for k, v in state["student"].items() for ik in initial
                 if k == ik or k.endswith("." + ik)]                # AYF: the teacher's weights inside a wrapper
        assert len(pairs) >= len(initial), method
        moved = [1 for v, v0 in pairs if not torch.equal(v, v0)]
        assert moved, f"{method}: the student trained"
        for k, v in state["student"].items():                        # the gathered weights: one model
            assert torch.equal(v, r1[method]["student"][k]), (method, k)
