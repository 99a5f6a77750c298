"""A toy bring-your-own teacher: a random-init tiny SD3 transformer on 1x8x8 samples.

It is the template for `teacher.kind: byo` (`factory: pipeline.teachers.toy:make_toy_teacher`) and the
fast teacher of plumbing tests: a real model of the SD3 class, just untrained.
"""
from __future__ import annotations

import zlib

import torch

from pipeline.teachers.base import TransformerTeacher

TOKENS, TEXT_DIM = 4, 16


def _hash_encoder(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Deterministic stand-in text encoder: each prompt seeds its own Gaussian embedding; "" is zeros."""
    ctx, pooled = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        e = torch.randn(TOKENS, TEXT_DIM, generator=g) if p else torch.zeros(TOKENS, TEXT_DIM)
        ctx.append(e)
        pooled.append(e.mean(0))
    return {"encoder_hidden_states": torch.stack(ctx), "pooled_projections": torch.stack(pooled)}


def make_toy_transformer(sample_size: int = 8, channels: int = 1, layers: int = 1, seed: int = 0, heads: int = 2,
                         head_dim: int = 8):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=channels,
                                 out_channels=channels, num_layers=layers, attention_head_dim=head_dim,
                                 num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=heads * head_dim, pooled_projection_dim=TEXT_DIM,
                                 pos_embed_max_size=sample_size // 2)


def make_toy_teacher(device="cpu", sample_size: int = 8, channels: int = 1, layers: int = 1, seed: int = 0,
                     heads: int = 2, head_dim: int = 8, weak: bool = True):
    """Factory in the byo signature: keyword arguments from `teacher.kwargs`, plus `device`; `heads` x `head_dim`
    is the width (bench/memory_plan.py builds an SD3-Medium-like 12 x 768 one); `weak`: an autoguidance model."""
    net = make_toy_transformer(sample_size, channels, layers, seed, heads, head_dim).to(device)
    weak = make_toy_transformer(sample_size, channels, layers, seed + 1, heads, head_dim).to(device) if weak else None
    return TransformerTeacher(net, _hash_encoder, lambda x: ((x.clamp(-1, 1) + 1) / 2),
                              (channels, sample_size, sample_size), weak_transformer=weak,
                              encode_images=lambda images: images)


def describe_toy_teacher(sample_size: int = 8, channels: int = 1, **_):
    """`teacher.describe` of the toy teacher: its layout from the same kwargs, nothing built."""
    from pipeline.teachers.base import TeacherLayout

    shape = (channels, sample_size, sample_size)
    return TeacherLayout.of(shape, {"encoder_hidden_states": (TOKENS, TEXT_DIM), "pooled_projections": (TEXT_DIM,)},
                            shape)
