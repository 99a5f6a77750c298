"""How a student trains over several ranks (train.workers > 1, Ray Train's process group): torch's own DDP.

The student is replicated with `torch.distributed._composable.replicate`, DDP's reducer applied to the
module in place: it stays the same module with the same parameter names, so a method calls it as it is
(plain forward, `torch.func.functional_call`, `jvp`), several forwards may share one backward, and
gradients are averaged by DDP's bucketed all-reduce during backward. `broadcast_buffers=False`: a LoRA
student is the teacher's own module, also called (adapters off) for the teacher solves outside the student's
forward and backward, so a forward must never start a collective.

The discriminator's heads are not wrapped: the trainer switches their requires_grad off for the generator
step (trainer.frozen), and DDP's reducer expects a gradient for every parameter it registered in every
backward; their (small) gradients are all-reduced by `average_gradients` after the D step.

`train.sharding: fsdp` (full students, several ranks) shards the student with FSDP2 instead (`shard_student`);
checkpoints gather its weights, EMA and AdamW moments whole into the one-file format (docs/students.md).
"""
from __future__ import annotations

import torch


def replicate_student(student: torch.nn.Module, world: int) -> torch.nn.Module:
    """DDP on the student, in place, when there is more than one rank (the process group exists)."""
    if world > 1:
        from torch.distributed._composable import replicate

        replicate(student, broadcast_buffers=False)
    return student


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """The mean gradient over ranks of parameters DDP does not manage (the discriminator's heads)."""
    if world == 1 or not params:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# ---------------------------------------------------------------- FSDP2 (train.sharding: fsdp)
def shard_student(student: torch.nn.Module, world: int, mixed_precision: str = "no") -> torch.nn.Module:
    """FSDP2 on a full student, in place: `fully_shard` per transformer block, then the root (the embeddings and
    output layers), so each rank keeps 1/world of every weight, gradient and AdamW moment and all-gathers one
    block at a time. The parameter names stay the module's (a checkpoint's keys are DDP's); each parameter is
    a DTensor whose `to_local()` is this rank's shard. Mixed precision: blocks compute in bf16/fp16 from the
    float32 shards, gradients are reduced in float32 (train.mixed_precision; autocast runs as under DDP)."""
    if world == 1:
        return student
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    blocks = [b for name, m in student.named_modules() if name.split(".")[-1] == "transformer_blocks"
              for b in m]
    if not blocks:
        raise ValueError("train.sharding fsdp needs a student with `transformer_blocks` (an SD3-style transformer)")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(student, mp_policy=policy)
    return student


def distribute_student(student: torch.nn.Module, world: int, train_cfg) -> bool:
    """DDP or FSDP2 on the student as train.sharding says; True when its weights are sharded."""
    if getattr(train_cfg, "sharding", "ddp") == "fsdp" and world > 1:
        shard_student(student, world, train_cfg.mixed_precision)
        return True
    replicate_student(student, world)
    return False


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def gather_full(tensors: dict) -> dict:
    """Whole tensors (on the CPU) for the sharded ones, plain ones as they are: collective when any is sharded,
    so every rank calls it in the same order."""
    return {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in tensors.items()}


def shard_like(full: dict, like: dict) -> dict:
    """Each whole tensor of `full` cut to this rank's shard where `like` (same keys) holds a DTensor: every rank
    holds the whole tensor (read from the one-file checkpoint), so the cut needs no communication."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for k, v in full.items():
        ref = like.get(k)
        out[k] = (distribute_tensor(v.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
                  if _is_dtensor(ref) else v)
    return out


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded moment gathered whole: the same format as under DDP/one rank."""
    state = opt.state_dict()
    return {**state, "state": {i: gather_full(s) for i, s in state["state"].items()}}


def shard_optimizer_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """A whole optimizer state (`full_optimizer_state`'s) cut to the shards of `params` (its order)."""
    def like(p, s):
        return {k: p for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape}

    return {**state, "state": {i: shard_like(s, like(params[int(i)], s)) for i, s in state["state"].items()}}


def all_ranks(flag: bool, world: int) -> bool:
    """True only when `flag` holds on every rank (each checked its own shards)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t) == 0


def sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
