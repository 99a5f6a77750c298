"""FlowSteer's discriminator: the teacher transformer's first blocks plus a token head per block.

Like LADD / SANA-Sprint, the backbone is the pretrained teacher itself, so the discriminator starts with
features that already know the data at every noise level; it is conditioned on the prompt (joint attention
with the context tokens, pooled text in the adaLN embedding) and on sigma (timestep embedding). Only the
first `blocks` transformer blocks are run, which keeps its cost a fraction of a student call. A frozen
backbone IS the teacher's modules (not a copy, and not registered as submodules: the discriminator's
parameters, state dict and optimiser are its heads); with a LoRA student those modules carry the student's
adapters, which its forward turns off (pipeline/lora.py): one copy of the base weights for all three.
"""
from __future__ import annotations

import contextlib
import copy
import math
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from pipeline.errors import UserError


class TokenHead(nn.Module):
    """StyleGAN-T / LADD style head over image tokens: 1x1 conv, residual k=3 conv, per-token logits
    plus a projection onto the condition embedding (projection discriminator): [B, N] logits, one per token."""

    def __init__(self, dim: int, cond_dim: int, hidden: int | None = None, spectral_norm: bool = False):
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
        return logits + proj


DEFAULT_DISC_BLOCKS = 2


def default_disc_blocks(depth: int) -> int:
    """`train.adversarial.disc_blocks: null`: the first 2 blocks, or every block of a shallower teacher."""
    return min(DEFAULT_DISC_BLOCKS, depth)


class TransformerDiscriminator(nn.Module):
    """D(x, sigma, cond) -> [B, L*N] per-token logits of L heads (one on every used block, as LADD), and
    per-block image-token features for feature matching.

    backbone "frozen" (default; LADD): the teacher's own blocks are fixed feature extractors, only the heads
    train -- the diagnosis in docs/ablation.md: a trainable copy with spectral-norm heads on the last block
    stayed at a constant output (hinge d_loss ~2.0). "trainable": the blocks fine-tune too (the paper's
    choice; takes the discriminator learning rate)."""

    def __init__(self, transformer: nn.Module, blocks: int | None, spectral_norm: bool = False,
                 backbone: str = "frozen"):
        super().__init__()
        available = len(transformer.transformer_blocks)
        blocks = default_disc_blocks(available) if blocks is None else blocks
        if not 1 <= blocks <= available:
            raise UserError(f"train.adversarial.disc_blocks is {blocks} but the teacher transformer has "
                            f"{available} blocks (use 1..{available})")
        if backbone not in ("frozen", "trainable"):
            raise UserError(f"discriminator backbone must be 'frozen' or 'trainable', got '{backbone}'")
        # exactly what the first blocks need: patch/pos embed, time-text embed, context embedder
        parts = {"pos_embed": transformer.pos_embed, "time_text_embed": transformer.time_text_embed,
                 "context_embedder": transformer.context_embedder,
                 "blocks": nn.ModuleList(transformer.transformer_blocks[i] for i in range(blocks))}
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.heads = nn.ModuleList(TokenHead(dim, dim, spectral_norm=spectral_norm) for _ in range(blocks))
        self.backbone = backbone
        if backbone == "frozen":          # the teacher's own (frozen) modules, in the teacher's dtype
            self.shared = SimpleNamespace(**parts)
        else:                             # a trainable float32 copy
            self.shared = None
            for name, part in parts.items():
                setattr(self, name, copy.deepcopy(part))
        self.float().train().requires_grad_(True)

    def _backbone(self):
        return self.shared or self

    def backbone_modules(self) -> list[nn.Module]:
        bb = self._backbone()
        return [bb.pos_embed, bb.time_text_embed, bb.context_embedder, bb.blocks]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                return_features: bool = False):
        from pipeline.lora import adapters_off

        bb = self._backbone()
        dtype = self.heads[0].cond_map.weight.dtype
        bdtype = next(bb.blocks.parameters()).dtype          # the teacher's, for a shared backbone
        x = x.to(bdtype)
        features, logits = [], []
        with adapters_off(*self.backbone_modules()) if self.shared else contextlib.nullcontext():
            tokens = bb.pos_embed(x).contiguous()
            timestep = (sigma * 1000).float().expand(x.shape[0])
            temb = bb.time_text_embed(timestep, cond["pooled_projections"].to(bdtype))
            context = bb.context_embedder(cond["encoder_hidden_states"].to(bdtype))
            for block, head in zip(bb.blocks, self.heads):
                context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
                features.append(tokens.to(dtype))
                logits.append(head(tokens.to(dtype), temb.to(dtype)))
        logits = torch.cat(logits, 1)
        return (logits, features) if return_features else logits


def sample_logits(logits: torch.Tensor) -> torch.Tensor:
    """One score per sample: the mean of its per-token logits (> 0 means 'real')."""
    return logits.reshape(logits.shape[0], -1).mean(1)


def accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of real samples scored > 0 and of fake samples scored < 0 (d_acc_real, d_acc_fake)."""
    return ((sample_logits(logits_real) > 0).float().mean(), (sample_logits(logits_fake) < 0).float().mean())


def pair_accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Share of rows whose real state scores above its fake (d_acc_pair): immune to an offset common to both,
    which moves d_acc_real / d_acc_fake together; 0.5 = chance (an estimate of the ROC AUC)."""
    return (sample_logits(logits_real) > sample_logits(logits_fake)).float().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))] (hinge GAN), the mean over every token's logit
    (LADD / SANA-Sprint: a token already on the right side of the margin stops pulling)."""
    return torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(fake)]."""
    return -logits_fake.mean()


def feature_matching_loss(features_real: list[torch.Tensor], features_fake: list[torch.Tensor]) -> torch.Tensor:
    """L_FM = sum over used blocks l of ||D_l(real) - D_l(fake)||^2 (mean over tokens and channels)."""
    return sum((fr.detach() - ff).pow(2).mean() for fr, ff in zip(features_real, features_fake))
