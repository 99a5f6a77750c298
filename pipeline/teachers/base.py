"""The teacher interface: a velocity field v(x, sigma, cond) plus prompt encoding.

Any object with these members can be a teacher (bring your own: `teacher.kind: byo`). Conditions are
dicts of batch-first tensors; the SD3 family uses the diffusers argument names below.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    sample_shape: tuple[int, ...]      # one sample's (C, H, W) in the space the ODE runs in (latents)
    device: torch.device

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt conditions, batch-first; the empty prompt "" is the unconditional (CFG) condition."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps; sigma has shape [B], in [0, 1]."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples to images in [0, 1], shape [B, C, H, W] (VAE decode for latent teachers)."""


def sd3_velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """Call an SD3Transformer2DModel in flowsteer's convention (timestep = 1000 sigma)."""
    t = (sigma * 1000).to(x.dtype).expand(x.shape[0])
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class TransformerTeacher:
    """A teacher made of an SD3-family transformer, a prompt encoder and a decoder."""

    def __init__(self, transformer, encode, decode, sample_shape, weak_transformer=None):
        self.transformer = transformer.eval().requires_grad_(False)
        self.weak_transformer = weak_transformer.eval().requires_grad_(False) if weak_transformer else None
        self._encode, self._decode = encode, decode
        self.sample_shape = tuple(sample_shape)
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            enc = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i:i + 1].to(self.device, self.dtype) for k, v in enc.items()}
        return {k: torch.cat([self._cache[p][k] for p in prompts]) for k in self._cache[prompts[0]]}

    def velocity(self, x, sigma, cond):
        return sd3_velocity(self.transformer, x, sigma, cond)

    def weak_velocity(self, x, sigma, cond):
        """An earlier, weaker checkpoint (autoguidance for Align Your Flow); None if the teacher has none."""
        return sd3_velocity(self.weak_transformer, x, sigma, cond)

    def decode(self, x):
        return self._decode(x)
