"""Several ranks (pipeline/sharding.py): torch's DDP keeps the replicas equal while each rank trains on its own
rows; two gloo ranks on the CPU, in spawned processes."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _rank(rank: int, world: int, store_dir: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.store import TrajectoryStore
    from pipeline.teachers.toy import make_toy_teacher
    from pipeline.trainer import Trainer
    from test_scflow import toy_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = toy_cfg(lr=1e-2, prefetch=0, batch_size=4)
        trainer = Trainer(cfg, "flowsteer", make_toy_teacher("cpu"), TrajectoryStore.open(store_dir, check_complete=False),
                          "cpu", rank=rank, world=world)
        for _ in range(2):
            trainer.train_step()
        torch.save({"student": {k: v.detach().clone() for k, v in trainer.student.state_dict().items()},
                    "heads": {k: v.detach().clone() for k, v in trainer.disc.state_dict().items()},
                    "rows": trainer.rows.at(1).rng.get_state()}, f"{out}/rank{rank}.pt")
        trainer.close()
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_replicas_equal_while_ranks_draw_their_own_rows(tmp_path):
    import torch.multiprocessing as mp

    from pipeline.teachers.toy import make_toy_teacher
    from test_scflow import build_store, toy_cfg

    build_store(tmp_path, toy_cfg(), make_toy_teacher("cpu"))
    port = 29600 + os.getpid() % 300
    mp.spawn(_rank, args=(2, str(tmp_path / "store.zarr"), port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["rows"], r1["rows"])                  # each rank its own batch stream
    initial = make_toy_teacher("cpu").transformer.state_dict()
    moved = [k for k, v in r0["student"].items() if not torch.equal(v, initial[k])]
    assert moved, "the student trained"
    for k in r0["student"]:                                          # DDP averaged: the replicas stay equal
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    for k in r0["heads"]:                                            # the discriminator's heads too
        assert torch.equal(r0["heads"][k], r1["heads"][k]), k
