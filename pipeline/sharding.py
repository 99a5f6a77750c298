"""How a student trains over several ranks (train.workers > 1, Ray Train's process group): torch's own DDP.

The student is replicated with `torch.distributed._composable.replicate`, DDP's reducer applied to the
module in place: it stays the same module with the same parameter names, so a method calls it as it is
(plain forward, `torch.func.functional_call`, `jvp`), several forwards may share one backward, and
gradients are averaged by DDP's bucketed all-reduce during backward. `broadcast_buffers=False`: a LoRA
student is the teacher's own module, which the prefetch thread calls at times that differ per rank, so a
forward must never start a collective.

The discriminator's heads are not wrapped: the trainer switches their requires_grad off for the generator
step (trainer.frozen), and DDP's reducer expects a gradient for every parameter it registered in every
backward; their (small) gradients are all-reduced by `average_gradients` after the D step.

Sharded full students (FSDP2, `torch.distributed.fsdp.fully_shard`) are not wired in yet: `flowsteer plan`
shows what they would hold per GPU (docs/students.md).
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
