"""FlowSteer's discriminator: the teacher transformer's first blocks (a trainable copy) plus a token head.

Like LADD / SANA-Sprint, the backbone is the pretrained teacher itself, so the discriminator starts with
features that already know the data at every noise level; it is conditioned on the prompt (joint attention
with the context tokens, pooled text in the adaLN embedding) and on sigma (timestep embedding). Only the
first `blocks` transformer blocks are copied and run, which keeps its cost a fraction of a student call.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from pipeline.errors import UserError


class TokenHead(nn.Module):
    """StyleGAN-T / LADD style head over image tokens: 1x1 conv, residual k=3 conv, per-token logits
    plus a projection onto the condition embedding (projection discriminator), averaged over tokens."""

    def __init__(self, dim: int, cond_dim: int, hidden: int | None = None, spectral_norm: bool = True):
        super().__init__()
        hidden = hidden or dim
        sn = _spectral_norm if spectral_norm else (lambda m: m)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)   # block outputs are the un-normed residual stream
        self.inp = sn(nn.Conv1d(dim, hidden, 1))
        self.mix = sn(nn.Conv1d(hidden, hidden, 3, padding=1))    # neighbouring tokens along the row
        self.out = sn(nn.Conv1d(hidden, 1, 1))
        self.cond_map = nn.Linear(cond_dim, hidden)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, tokens: torch.Tensor, cond_embedding: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(self.norm(tokens).transpose(1, 2)))            # [B, hidden, N]
        h = h + self.act(self.mix(h))
        logits = self.out(h).squeeze(1)                                      # [B, N]
        proj = (h * self.cond_map(cond_embedding).unsqueeze(-1)).sum(1) / math.sqrt(h.shape[1])
        return (logits + proj).mean(1)                                       # one logit per sample


class TransformerDiscriminator(nn.Module):
    """D(x, sigma, cond) -> [B] logits (and per-block image-token features for feature matching)."""

    def __init__(self, transformer: nn.Module, blocks: int, spectral_norm: bool = True):
        super().__init__()
        available = len(transformer.transformer_blocks)
        if not 1 <= blocks <= available:
            raise UserError(f"train.adversarial.disc_blocks is {blocks} but the teacher transformer has "
                            f"{available} blocks (use 1..{available})")
        # copies of exactly what the first blocks need: patch/pos embed, time-text embed, context embedder
        self.pos_embed = copy.deepcopy(transformer.pos_embed)
        self.time_text_embed = copy.deepcopy(transformer.time_text_embed)
        self.context_embedder = copy.deepcopy(transformer.context_embedder)
        self.blocks = nn.ModuleList(copy.deepcopy(transformer.transformer_blocks[i]) for i in range(blocks))
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.head = TokenHead(dim, dim, spectral_norm=spectral_norm)
        self.float().train().requires_grad_(True)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                return_features: bool = False):
        dtype = self.head.cond_map.weight.dtype
        x = x.to(dtype)
        tokens = self.pos_embed(x).contiguous()
        timestep = (sigma * 1000).to(dtype).expand(x.shape[0])
        temb = self.time_text_embed(timestep, cond["pooled_projections"].to(dtype))
        context = self.context_embedder(cond["encoder_hidden_states"].to(dtype))
        features = []
        for block in self.blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
            features.append(tokens)
        logits = self.head(tokens, temb)
        return (logits, features) if return_features else logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))] (hinge GAN)."""
    return torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(fake)]."""
    return -logits_fake.mean()


def feature_matching_loss(features_real: list[torch.Tensor], features_fake: list[torch.Tensor]) -> torch.Tensor:
    """L_FM = sum over used blocks l of ||D_l(real) - D_l(fake)||^2 (mean over tokens and channels)."""
    return sum((fr.detach() - ff).pow(2).mean() for fr, ff in zip(features_real, features_fake))
