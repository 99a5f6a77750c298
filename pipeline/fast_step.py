"""What makes the student's step faster without changing what it computes (docs/precision.md, "A faster step").

- `train.compile`: regional torch.compile, each transformer block compiled in place (`Module.compile`, so
  parameter names, state dicts, checkpoints and exports stay those of the plain model; with torch's inlined
  module parameters the blocks of one class reuse one graph). `plain_copy` gives a deep copy that runs eagerly.
- fused AdamW on CUDA (one kernel for all parameters; the same update as the for-each one).
- `train.gradient_checkpointing`: diffusers' activation checkpointing of the blocks (memory for compute).
- TF32 matmuls on CUDA where float32 remains (autocast off, or float32 ops under it).
"""
from __future__ import annotations

import copy

import torch


def transformer_blocks(model: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The repeated blocks of an SD3-style transformer (`transformer_blocks`), or none (also for no model)."""
    return list(getattr(model, "transformer_blocks", None) or [])


def compile_blocks(model: torch.nn.Module, **options) -> int:
    """Compile each transformer block in place (regional compilation); returns how many were compiled."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that runs eagerly: a block compiled in place keeps, in its copy, a compiled call bound to
    the original block, which would silently run the original's weights."""
    out = copy.deepcopy(model)
    for module in out.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return out


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing (train.gradient_checkpointing)")
    model.enable_gradient_checkpointing()


def use_tf32(device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions for float32 on CUDA (10-bit mantissa inputs, float32 sums)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw(params, lr: float, weight_decay: float, device, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; `fused` None = fused on CUDA (one multi-tensor kernel), for-each elsewhere."""
    fused = torch.device(device).type == "cuda" if fused is None else fused
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def prepare_student(student: torch.nn.Module, train_cfg, device) -> torch.nn.Module:
    """Apply train.gradient_checkpointing, train.compile and TF32 to the student (in place)."""
    use_tf32(device)
    if getattr(train_cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(student)
    if getattr(train_cfg, "compile", False):
        compile_blocks(student)
    return student
