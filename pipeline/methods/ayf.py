"""Align Your Flow, Eulerian map distillation (AYF-EMD; Sabour et al. 2025) on flowsteer's trajectories.

A flow-map student f(x, t, s) = x + (s - t) F(x, t, s) jumps from time t straight to any s < t; s = 0 is a
consistency model, s -> t is flow matching (F(x, t, t) = v). Per step (docs/methods.md, Align Your Flow):
  v = T_w(x_t, t) = T_u + w (T_c - T_u), w the row's CFG scale      the SAME guided field as every other
                                                                     method (guidance: cfg, the default), so
                                                                     the ladder compares like with like;
  or v = lam T + (1 - lam) T_weak, lam ~ U[1, 3]                     AYF's autoguidance (guidance: auto)
  (Fm, dF/dt) = jvp(F, (x_t, t, s), (v, 1, 0))                     no grad: total derivative along the ODE
  g = (Fm - v) + r (t - s) dF/dt,  r = min(0.99, step / warmup)    tangent warm-up
  g <- g / (||g|| + c), c = 0.1 per sample                          tangent normalisation
  L = ||F - sg(Fm - g)||^2                                          gradient = g dF/dtheta
g = 0 is the Eulerian condition d/dt f(x_t, t, s) = 0: the jump's landing point does not move as x_t
slides along the teacher ODE.

How s reaches the SD3 transformer: `FlowMapTransformer` wraps an unchanged SD3Transformer2DModel and adds
a small embedding of the jump length t - s (sinusoidal features of 1000 (t - s), the same Timesteps +
TimestepEmbedding pair SD3 uses for t) to the output of `time_text_embed`, through a forward hook, so it
joins t and the pooled prompt in the AdaLN conditioning of every block. Its last linear layer starts at
zero, so at init F(x, t, s) = the teacher velocity for every s. The inner transformer stays a plain
diffusers model (save_pretrained works on it); the gap embedding is saved beside it in the same directory.

Where (t, s) and x_t come from (a choice): t as in SCFlow (uniform unshifted time inside the row's window,
x_t on the chord of the cached boundary states), s = shift(u_s) with u_s ~ U[0, u_t): continuous pairs,
so every pair of every fixed grid (any NFE) is in the support. Sampling chains f over fixed_sigmas(nfe).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.errors import UserError
from pipeline.methods.base import Method, MethodOptions, register
from pipeline.methods.common import on_trajectory_points, rowwise, uniform
from pipeline.sampling import guided
from pipeline.schedule import fixed_sigmas, shift_sigma, unshift_sigma
from pipeline.teachers.base import sd3_velocity

class AYFOptions(MethodOptions):
    tangent_warmup: int = 100               # r = min(0.99, step / tangent_warmup)
    norm_c: float = 0.1                     # g / (||g|| + c)
    autoguidance: list[float] = [1.0, 3.0]  # lam ~ U[lo, hi]; v = lam T + (1 - lam) T_weak
    # cfg: the teacher with CFG at the row's w (the target of perflow/ota/flowsteer, and of evaluation);
    # auto: AYF's autoguidance when the teacher has a weak model (another target: an ablation, not the ladder)
    guidance: str = "cfg"
    jvp: str = "auto"                       # auto | torch (torch.func.jvp, math SDPA) | fd (central difference)
    fd_eps: float = 1e-4
GAP_FILE = "flow_map_gap.pt"


def _add_gap(module, args, out):
    """Forward hook on time_text_embed: conditioning += embedding of t - s (set just before the call)."""
    gap = module.__dict__.get("_flow_map_gap")
    return out if gap is None else out + gap.to(out.dtype)


class FlowMapTransformer(nn.Module):
    """F(x, t, s): an SD3Transformer2DModel plus a zero-initialised embedding of the jump t - s."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.transformer = transformer
        dim = transformer.time_text_embed.timestep_embedder.linear_2.out_features
        self.gap_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.gap_embed = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        nn.init.zeros_(self.gap_embed.linear_2.weight)     # F(x, t, s) = F(x, t, t) = teacher v at init
        nn.init.zeros_(self.gap_embed.linear_2.bias)
        slot = transformer.time_text_embed
        if _add_gap not in slot._forward_hooks.values():   # once: a LoRA student wraps the teacher's own module
            slot.register_forward_hook(_add_gap)             # module-level fn: deepcopy/pickle safe

    def forward(self, x, t, s, cond):
        gap = (t - s).expand(x.shape[0]) * 1000
        emb = self.gap_embed(self.gap_proj(gap).to(self.gap_embed.linear_1.weight.dtype))
        slot = self.transformer.time_text_embed
        slot._flow_map_gap = emb
        try:
            return sd3_velocity(self.transformer, x, t, cond)
        finally:
            slot._flow_map_gap = None


def flow_map(student, x, t, s, cond):
    """f(x, t, s) = x + (s - t) F(x, t, s)."""
    return x + rowwise(s - t, x) * student(x, t, s, cond)


def normalised_tangent(F_m, v, dF_dt, t, s, r: float, c: float):
    """g = (F - v) + r (t - s) dF/dt, divided by its per-sample norm + c (AYF-EMD with sCM's normalisation)."""
    g = (F_m - v) + r * rowwise(t - s, v) * dF_dt
    return g / (rowwise(g.flatten(1).norm(dim=1), g) + c)


def jvp_torch(fn, x, t, s, v):
    """(F, dF/dt along (v, 1, 0)) by forward-mode AD; math SDPA since fused kernels lack forward AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))


def jvp_fd(module, cond, x, t, s, v, eps: float = 1e-4):
    """(F, dF/dt) by a central difference, in float64 where the device has it (exact to ~eps^2)."""
    dt = torch.float32 if x.device.type == "mps" else torch.float64
    state = {k: p.detach().to(dt) for k, p in {**dict(module.named_parameters()),
                                               **dict(module.named_buffers())}.items()}
    c = {k: w.to(dt) for k, w in cond.items()}
    x, t, s, v = x.to(dt), t.to(dt), s.to(dt), v.to(dt)

    def F(x_, t_):
        return torch.func.functional_call(module, state, (x_, t_, s, c))
    d = (F(x + eps * v, t + eps) - F(x - eps * v, t - eps)) / (2 * eps)
    return F(x, t), d


@register
class AlignYourFlow(Method):
    name = "ayf-emd"
    description = ("Align Your Flow (Eulerian map distillation): a flow map f(x, t, s) = x + (s - t) F(x, t, s) "
                   "trained with the teacher's autoguided velocity and a normalised tangent.")
    Options = AYFOptions
    ladder_rank = 50                        # last: a flow map, not a drop-in student

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.options["jvp"] not in ("auto", "torch", "fd") or self.options["guidance"] not in ("auto", "cfg"):
            raise UserError(f"train.method_options.{self.name}: jvp must be auto|torch|fd and guidance auto|cfg")
        self._jvp = self.options["jvp"]

    # --- the flow-map student
    def wrap_student(self, transformer):
        """With LoRA (train.student) the adapters sit in `transformer`; the gap embedding is new, so it trains
        in full beside them (like peft's modules_to_save)."""
        return FlowMapTransformer(transformer)

    @staticmethod
    def velocity(student, x, sigma, cond, s=None, **extra):
        """F(x, t, s); with s omitted, F(x, t, t): the instantaneous velocity (the s -> t limit)."""
        return student(x, sigma, sigma if s is None else s, cond)

    # Not a drop-in: StableDiffusion3Pipeline would load the transformer without the gap embedding (it never
    # passes s) and run Euler, which is neither F(x, t, t) nor the flow map; its samples differ silently.
    drop_in = False

    @classmethod
    def save_student(cls, student, directory):
        """The diffusers transformer dir, plus the gap embedding (and its size) in a file inside it."""
        directory = Path(directory)
        student.transformer.save_pretrained(str(directory))
        torch.save(student.gap_embed.state_dict(), directory / GAP_FILE)
        (directory / "flow_map.json").write_text(json.dumps({"method": cls.name, "gap_file": GAP_FILE}))

    @classmethod
    def load_student(cls, directory, device):
        from diffusers import SD3Transformer2DModel

        directory = Path(directory)
        if not (directory / GAP_FILE).is_file():
            raise UserError(f"{directory}: no {GAP_FILE}; not an {cls.name} student export")
        student = FlowMapTransformer(SD3Transformer2DModel.from_pretrained(str(directory)))
        student.gap_embed.load_state_dict(torch.load(directory / GAP_FILE, map_location="cpu", weights_only=True))
        return student.to(device).eval()

    # --- one step
    @torch.no_grad()
    def draw(self, step, rows):
        n, shift = self.ctx.cfg.train.batch_size, self.ctx.cfg.schedule.shift
        seg = rows.segments(n)
        t, x_t = on_trajectory_points(seg, shift, rows.rng)
        u_s = unshift_sigma(t.double(), shift) * uniform(n, rows.rng, t).double()
        s = shift_sigma(u_s, shift).to(t)
        return {"x_t": x_t, "t": t, "s": s, "cond": seg["cond"], "guidance": seg["guidance"]}

    def complete(self, drawn):
        drawn["null_cond"] = self.ctx.solves.null_cond(len(drawn["t"]))
        return drawn

    @torch.no_grad()
    def teacher_velocity(self, x, t, cond, guidance, null_cond):
        """CFG at the row's w (default: the ladder's shared target), or autoguidance lam T + (1 - lam) T_weak."""
        teacher = self.ctx.teacher
        if self.options["guidance"] == "cfg" or getattr(teacher, "weak_transformer", None) is None:
            return guided(teacher.velocity, null_cond, guidance)(x, t, cond)
        lo, hi = self.options["autoguidance"]
        lam = rowwise(lo + (hi - lo) * uniform(len(x), self.ctx.step_rng, t), x)
        return lam * teacher.velocity(x, t, cond) + (1 - lam) * teacher.weak_velocity(x, t, cond)

    @torch.no_grad()
    def tangent(self, student, x, t, s, v, cond):
        """(F, dF/dt) of the student along the teacher ODE; `jvp: auto` falls back to FD if AD fails."""
        if self._jvp in ("auto", "torch"):
            try:
                return jvp_torch(lambda x_, t_, s_: student(x_, t_, s_, cond), x, t, s, v)
            except (RuntimeError, NotImplementedError):
                if self._jvp == "torch":
                    raise
                self._jvp = "fd"       # this model has an op without forward AD: stay on FD from now on
        F_m, d = jvp_fd(student, cond, x, t, s, v, self.options["fd_eps"])
        return F_m.to(x.dtype), d.to(x.dtype)

    def generator_losses(self, student, batch, step):
        x, t, s, cond = batch["x_t"], batch["t"], batch["s"], batch["cond"]
        v = self.teacher_velocity(x, t, cond, batch["guidance"], batch["null_cond"])
        F_m, dF_dt = self.tangent(student, x, t, s, v, cond)
        r = min(0.99, step / max(1, self.options["tangent_warmup"]))
        g = normalised_tangent(F_m, v, dF_dt, t, s, r, self.options["norm_c"])
        F_theta = student(x, t, s, cond)
        loss = (F_theta - (F_m - g)).square().mean()
        return {"loss": loss, "emd": loss.detach(), "tangent_norm": g.flatten(1).norm(dim=1).mean()}

    # --- sampling
    @classmethod
    @torch.no_grad()
    def sample(cls, student, noise, cond, nfe, num_windows, shift, callback=None, sigmas=None):
        """Chain the flow map over fixed_sigmas(nfe, shift) (or `sigmas`): x_{s_{i+1}} = f(x_{s_i}, s_i, s_{i+1})."""
        sigmas = (fixed_sigmas(nfe, shift) if sigmas is None else sigmas).to(noise.device)
        x = noise
        for i in range(nfe):
            t, s = sigmas[i].expand(len(x)), sigmas[i + 1].expand(len(x))
            F_i = student(x, t, s, cond)
            if callback is not None:
                callback(i, x, sigmas[i], F_i)
            x = x + rowwise(s - t, x) * F_i
        if callback is not None:
            callback(nfe, x, sigmas[-1], None)
        return x
