"""The exact benchmark teacher (`teacher.kind: exact`): a class-conditional Gaussian mixture in latent shape
whose velocity field and ODE solution are known, so a method can be checked against ground truth.

Data: class c (a prompt, `class_of`) has M equally likely modes x0 ~ N(mu_{c,m}, s^2 I) in C x H x W
latents; the means are smooth random images (`smooth_means`, entries of std mean_std) drawn from
`teacher.exact.mixture_seed`. On flowsteer's path
x_t = (1 - t) x0 + t eps (t = sigma, 1 = noise, docs/methods.md) with a = 1 - t, mode k gives
x_t ~ N(a mu_k, var I), var = a^2 s^2 + t^2, and (jointly Gaussian)
  E[x0 | x_t, k]  = mu_k + (a s^2 / var) (x_t - a mu_k),   E[eps | x_t, k] = (t / var) (x_t - a mu_k),
so the exact velocity v = E[eps - x0 | x_t] is
  v(x_t, t) = sum_k w_k(x_t) [ (t - a s^2) / var (x_t - a mu_k) - mu_k ]
            = (t - a s^2) / var (x_t - a mu_bar) - mu_bar,    mu_bar = sum_k w_k mu_k,
with posterior weights w_k proportional to exp(-|x_t - a mu_k|^2 / (2 var)) over the modes of the row's class
(all modes for the empty prompt, the unconditional field CFG needs). CFG is the usual v_u + w (v_c - v_u)
(pipeline/sampling.guided). `exact_endpoints` solves the guided ODE by classical RK4 on a fine grid: the
"exact ODE" the `exact_*` metrics compare students with (pipeline/metrics/trajectory.py).

The students still need an SD3-architecture network to start from (and the discriminator its blocks): the
teacher stage pretrains one on this field (`pretrain_init`: regression on the exact velocity at points of the
path, CFG dropout), cached like the embedded teacher; `transformer` is that net, `weak_transformer` its early
snapshot (AYF autoguidance). Every teacher *call* (generate, targets, evaluation) is the closed form.
"""
from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.teachers.base import TeacherLayout, sd3_velocity

COND_DIM, TOKENS = 32, 2          # condition layout: one-hot class in pooled and token 0, a class code in token 1
TRANSFORMER, WEAK = "transformer", "weak_transformer"


def class_of(prompt: str, classes: int) -> int | None:
    """A prompt's class: a digit prompt its digit (mod classes), any other prompt a hash; "" is None
    (unconditional)."""
    from pipeline.digits import DIGIT_PROMPTS

    if not prompt:
        return None
    if prompt in DIGIT_PROMPTS:
        return DIGIT_PROMPTS.index(prompt) % classes
    return zlib.crc32(prompt.encode()) % classes


class GaussianMixture:
    """The mixture's parameters and closed forms (float64 inside, float32 out)."""

    def __init__(self, ecfg, device="cpu"):
        self.classes, self.modes, self.std = ecfg.classes, ecfg.modes_per_class, ecfg.mode_std
        self.shape = (ecfg.channels, ecfg.sample_size, ecfg.sample_size)
        g = torch.Generator().manual_seed(ecfg.mixture_seed)
        self.means = smooth_means(self.classes * self.modes, self.shape, ecfg.mean_std, g).to(device)
        self.codes = torch.randn(self.classes, COND_DIM, generator=g)    # token 1 of each class's condition
        self.device = torch.device(device)

    def encode_classes(self, classes: list[int | None]) -> dict[str, torch.Tensor]:
        onehot = torch.zeros(len(classes), COND_DIM)
        code = torch.zeros(len(classes), COND_DIM)
        for i, c in enumerate(classes):
            if c is not None:
                onehot[i, c] = 1.0
                code[i] = self.codes[c]
        return {"encoder_hidden_states": torch.stack([onehot, code], 1), "pooled_projections": onehot}

    def classes_from(self, cond: dict) -> torch.Tensor:
        """Each row's class from its condition (-1 = unconditional); robust to float16 stores."""
        pooled = cond["pooled_projections"][:, :self.classes].float()
        return torch.where(pooled.sum(1) > 0.5, pooled.argmax(1), torch.full_like(pooled.argmax(1), -1))

    def _mask(self, classes: torch.Tensor) -> torch.Tensor:
        """[B, K] True where mode k belongs to the row's class (every mode for an unconditional row)."""
        owner = torch.arange(self.classes * self.modes, device=classes.device) // self.modes
        return (owner[None] == classes[:, None]) | (classes[:, None] < 0)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The exact v = E[eps - x0 | x_sigma] of the row's class (module docstring)."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(self.device, torch.float64)
        t = sigma.to(self.device, torch.float64).reshape(-1, 1).expand(b, 1)
        a, s2 = 1 - t, self.std ** 2
        var = a * a * s2 + t * t
        d2 = (xf * xf).sum(1, keepdim=True) - 2 * a * xf @ self.means.T + a * a * (self.means ** 2).sum(1)[None]
        logits = (-d2 / (2 * var)).masked_fill(~self._mask(classes.to(self.device)), float("-inf"))
        mu_bar = torch.softmax(logits, 1) @ self.means
        v = (t - a * s2) / var * (xf - a * mu_bar) - mu_bar
        return v.to(torch.float32).reshape(x.shape).to(x.device)

    def modes_of(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's nearest mode (its posterior argmax at t = 0: equal weights and widths): [N] in
        0..classes*modes-1; the class is mode // modes_per_class."""
        xf = x.reshape(x.shape[0], -1).to(self.device, torch.float64)
        return torch.cdist(xf, self.means).argmin(1).cpu()

    def sample(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact data: x0 = mu_{c, m} + s z, m uniform, z ~ N(0, I) (CPU generator)."""
        m = torch.randint(self.modes, (len(classes),), generator=generator)
        z = torch.randn(len(classes), self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means.cpu()[classes.cpu() * self.modes + m] + self.std * z
        return x.to(torch.float32).reshape(len(classes), *self.shape)


def smooth_means(n: int, shape: tuple[int, int, int], std: float, generator: torch.Generator) -> torch.Tensor:
    """[n, C*H*W] mode means on a smooth basis: per channel, a random mix of 1, cos(pi y / H), cos(pi x / W)
    and their product (each unit RMS), so each entry has standard deviation `std`. Why smooth: a mode is then
    a few numbers an SD3 transformer of patch tokens can read and draw (the pretrained init learns the field
    in minutes on a CPU), while samples still spread over all C*H*W dimensions through the mode noise."""
    c, h, w = shape
    y = torch.cos(torch.pi * (torch.arange(h, dtype=torch.float64) + 0.5) / h)
    x = torch.cos(torch.pi * (torch.arange(w, dtype=torch.float64) + 0.5) / w)
    basis = torch.stack([torch.ones(h, w, dtype=torch.float64), y[:, None].expand(h, w), x[None].expand(h, w),
                         y[:, None] * x[None]])
    basis = basis / basis.pow(2).mean((1, 2), keepdim=True).sqrt()
    coef = torch.randn(n, c, len(basis), generator=generator, dtype=torch.float64) * std / len(basis) ** 0.5
    return torch.einsum("nck,khw->nchw", coef, basis).reshape(n, -1)


def decode_latents(x: torch.Tensor) -> torch.Tensor:
    """Latents to images for grids and pixel FID: the first three channels (or the first, repeated) as RGB,
    x / 2 clamped to [-1, 1] into [0, 1], each latent pixel a 4 x 4 block."""
    rgb = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    img = ((rgb.float() / 2).clamp(-1, 1) + 1) / 2
    return F.interpolate(img, scale_factor=4, mode="nearest")


class ExactTeacher:
    """Teacher protocol (pipeline/teachers/base.py) with the exact field; `transformer` is the pretrained init."""

    def __init__(self, ecfg, transformer=None, weak_transformer=None, device="cpu"):
        self.ecfg = ecfg
        self.mixture = GaussianMixture(ecfg, device)
        self.sample_shape = self.mixture.shape
        self.device = torch.device(device)
        self.transformer = transformer.eval().requires_grad_(False) if transformer is not None else None
        self.weak_transformer = weak_transformer.eval().requires_grad_(False) if weak_transformer is not None else None

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.mixture.encode_classes([class_of(p, self.ecfg.classes) for p in prompts])
        return {k: v.to(self.device) for k, v in enc.items()}

    def velocity(self, x, sigma, cond):
        return self.mixture.velocity(x, sigma.expand(x.shape[0]), self.mixture.classes_from(cond))

    def weak_velocity(self, x, sigma, cond):
        return sd3_velocity(self.weak_transformer, x, sigma, cond)

    def decode(self, x):
        return decode_latents(x)

    def modes_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.modes_of(x)

    def sample_data(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Exact data samples x0 for these prompts (PeRFlow's x0, SCFlow's reals): no image files."""
        classes = torch.tensor([class_of(p, self.ecfg.classes) for p in prompts])
        return self.mixture.sample(classes, generator).to(self.device)

    @torch.no_grad()
    def exact_endpoints(self, noise: torch.Tensor, cond: dict, null_cond: dict, guidance: float,
                        steps: int | None = None, shift: float = 3.0) -> torch.Tensor:
        """The guided ODE's x_0 from x_1 = noise by classical RK4 on `steps` intervals of the shifted grid."""
        from pipeline.sampling import guided
        from pipeline.schedule import fixed_sigmas

        return rk4(guided(self.velocity, null_cond, guidance), noise,
                   fixed_sigmas(steps or self.ecfg.exact_steps, shift).double(), cond)


def rk4(velocity, x: torch.Tensor, sigmas: torch.Tensor, cond: dict) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta for dx/dsigma = v(x, sigma) along `sigmas` (decreasing)."""
    x = x.double()
    for s0, s1 in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        h = s1 - s0

        def f(y, s):
            return velocity(y.float(), torch.full((len(y),), s, device=y.device), cond).double()
        k1 = f(x, s0)
        k2 = f(x + h / 2 * k1, s0 + h / 2)
        k3 = f(x + h / 2 * k2, s0 + h / 2)
        k4 = f(x + h * k3, s1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.float()


# ---------------------------------------------------------------- the SD3-architecture init
def make_init_transformer(ecfg, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    width = ecfg.num_attention_heads * ecfg.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=ecfg.sample_size, patch_size=ecfg.patch_size, in_channels=ecfg.channels,
        out_channels=ecfg.channels, num_layers=ecfg.num_layers, attention_head_dim=ecfg.attention_head_dim,
        num_attention_heads=ecfg.num_attention_heads, joint_attention_dim=COND_DIM, pooled_projection_dim=COND_DIM,
        caption_projection_dim=width, pos_embed_max_size=ecfg.sample_size // ecfg.patch_size)


def pretrain_init(out_dir, ecfg, seed: int = 0, device="cpu", log: Callable[[str], None] = print) -> dict:
    """Regress an SD3 transformer on the exact velocity: x_t from exact data, t from SD3's shifted logit-normal
    (pipeline/teachers/embedded.sample_sigmas), the class dropped for `prompt_dropout` of the rows (the
    unconditional field), MSE to v_exact; EMA saved as `transformer/`, the EMA at `weak_checkpoint_step`
    as `weak_transformer/`. Short (minutes on a CPU), cached by the teacher stage's record."""
    from pipeline.teachers.embedded import _lr_factor, pretrain_step, sample_sigmas, save_model_dir

    out_dir, device = Path(out_dir), torch.device(device)
    mixture = GaussianMixture(ecfg, device)
    net = make_init_transformer(ecfg, seed).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    total = ecfg.train_steps
    opt = torch.optim.AdamW(net.parameters(), lr=ecfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, max(1, total // 20)))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for step in range(total):
        classes = torch.randint(ecfg.classes, (ecfg.batch_size,), generator=gen)
        drop = torch.rand(ecfg.batch_size, generator=gen) < ecfg.prompt_dropout
        x0 = mixture.sample(classes, gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        sigma = sample_sigmas(ecfg.batch_size, gen).to(device)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        rows = torch.where(drop, torch.full_like(classes, -1), classes)
        cond = {k: v.to(device) for k, v in mixture.encode_classes([None if c < 0 else int(c) for c in rows]).items()}
        target = mixture.velocity(x_t, sigma, rows)
        loss = F.mse_loss(sd3_velocity(net, x_t, sigma, cond), target)
        pretrain_step(net, ema, opt, sched, loss, step, ecfg.ema_decay)
        losses.append(loss.item())
        if step + 1 == min(ecfg.weak_checkpoint_step, total):
            save_model_dir(ema, out_dir / WEAK)
        if (step + 1) % 200 == 0 or step + 1 == total:
            recent = losses[-200:]
            log(f"teacher: exact init step {step + 1}/{total} loss {sum(recent) / len(recent):.4f} "
                f"({(time.time() - t0) / (step + 1):.3f} s/step)")
    save_model_dir(ema, out_dir / TRANSFORMER)
    return {"steps": total, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
            "train_seconds": round(time.time() - t0, 1)}


def load_exact_teacher(teacher_dir, ecfg, device="cpu") -> ExactTeacher:
    from pipeline.teachers.embedded import load_trained

    net, weak = load_trained(teacher_dir, device, "no pretrained init for the exact teacher")
    return ExactTeacher(ecfg, net, weak, device)


def describe_exact(ecfg) -> TeacherLayout:
    shape = (ecfg.channels, ecfg.sample_size, ecfg.sample_size)
    return TeacherLayout.of(shape, {"encoder_hidden_states": (TOKENS, COND_DIM), "pooled_projections": (COND_DIM,)})
