"""SCFlow: Self-Corrected Flow Distillation (Dao et al., AAAI 2025), on flowsteer's cached teacher trajectories.

Consistency function f(z, t) = z - t v(z, t) (sigma=1 noise). Per step (docs/methods.md, SCFlow):
  z_m = z_t - dn v_T,  z_p = z_t + up v_T                 teacher Euler skips, CFG at the row's w, no grad
  tgt_m = f_ema(z_m, t - dn),  tgt_p = f_ema(z_p, t + up)  from the target EMA (decay 0.9) of the student
  tgt_m := z0 where t - dn < tau                           truncated consistency (ground truth at small t)
  L = PH(f(z_t,t), tgt_m) + 0.1[s>w_rf] L_rf + 0.01[s>w_gan] L_G + 0.1[s>w_bi] PH(f(z_t,t), tgt_p)
with the reflow loss on the student's own one-step output and a GAN on that output. The GAN is a choice:
flowsteer's discriminator (the teacher's first blocks + token heads, train.adversarial) with hinge losses, on
clean samples (sigma = 0), real = real data when the run has it (the digits of the embedded teacher, the
latents of `data.images`), else cached final teacher samples; fake = the one-step output; SCFlow's
non-saturating loss + R1 would need a double backward through attention on every D step.

Where z_t comes from (a choice): ON the cached teacher trajectory, not on the reflow line (1-t) z0 + t eps.
A row draws a window k (StepRows.segments), u uniform inside the window in unshifted time and
t = shift(u), and z_t on the chord between the window's two cached boundary states (as PeRFlow does); so
t over all rows follows the SD3 shifted-uniform density and every z_t lies within one window of the
teacher's own trajectory. Ground truth z0 = that trajectory's final cached state: for last-window rows
it is the segment's end; other rows that need it are rolled on by the teacher's windows from the
segment's end (TeacherSolves.teacher_window), which is deterministic and so reproduces the cached final
state (rarely needed: with tau=0.4, shift 3 and 4 windows only last-window rows truncate).

Pitfalls of the public code that this file avoids (tests/test_scflow.py checks them):
  * the teacher is never a copy of a resumed student: the method only reads ctx.teacher (frozen);
  * the target EMA is made in make_student, i.e. AFTER the student was initialised from the teacher,
    and it is saved in state_dict / restored by load_state_dict, so a resume continues the same target.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from pipeline.methods.base import Method, MethodOptions, register
from pipeline.methods.common import on_trajectory_points, rowwise, uniform
from pipeline.methods.discriminator import (TransformerDiscriminator, accuracy, hinge_d_loss, hinge_g_loss,
                                            pair_accuracy)
from pipeline.sampling import euler, guided
from pipeline.schedule import fixed_sigmas

class SCFlowOptions(MethodOptions):
    delta: float = 0.1          # largest teacher skip (SCFlow init_threshold)
    tau: float = 0.4            # truncation threshold t_trunc (the T2I script uses 0.1)
    huber_c: float = 0.01       # pseudo-Huber constant
    target_decay: float = 0.9   # target-EMA decay
    lambda_rf: float = 0.1
    # the paper's 0.1 is for its softplus(+R1) GAN; with this hinge GAN (L_G = -D, unbounded) and a fresh
    # discriminator from step 0 it wrecked the study's students (4-NFE prompt accuracy 0.95 at step 0 -> 0.40 at
    # step 200, EMA weights); at 0.01 it stays a small term (measured: docs/methods.md, SCFlow)
    lambda_gan: float = 0.01
    lambda_bi: float = 0.1
    warmup_rf: int = 50         # warm-ups scaled down from CelebA's 1000 for short runs
    warmup_gan: int = 0
    warmup_bi: int = 50


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Elementwise pseudo-Huber sqrt((a-b)^2 + c^2) - c, averaged (iCT / SCFlow consistency metric)."""
    return (torch.sqrt((a - b).square() + c * c) - c).mean()


def consistency(velocity, z: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """f(z, t) = z - t v(z, t): the x0 estimate of a velocity model (SCFlow eq. for f_theta)."""
    return z - rowwise(t, z) * velocity(z, t, cond)


def truncated_target(tgt_m: torch.Tensor, z0: torch.Tensor, t_minus: torch.Tensor, tau: float) -> torch.Tensor:
    """Truncated consistency: below tau the target is the ground truth z0, not the EMA's estimate."""
    return torch.where(rowwise(t_minus < tau, tgt_m).bool(), z0, tgt_m)


@register
class SCFlow(Method):
    name = "scflow"
    description = ("SCFlow (self-corrected flow): consistency against a target EMA with short teacher skips, "
                   "truncated below tau, plus a bidirectional term, reflow of its own one-step output and a hinge GAN.")
    uses_adversarial = True               # its optional GAN term builds flowsteer's discriminator
    graph_calls = 2.0                     # f(z_t, t) and the one-step output (reflow, GAN) keep a graph
    shards = False                        # its target runs as the student with other weights (torch.func)
    Options = SCFlowOptions
    ladder_rank = 40                      # after FlowSteer's own rows, under the same CFG target

    def __init__(self, ctx):
        super().__init__(ctx)
        self.target: torch.nn.Module | None = None     # made in make_student (after init from the teacher)
        self._pending_target: dict | None = None       # a state loaded before make_student ran
        self._disc = None

    # --- student and target EMA
    def make_student(self, teacher_transformer):
        student = super().make_student(teacher_transformer)
        self._sync_target(student)        # a copy of the student AFTER its init from the teacher
        return student

    def _sync_target(self, student):
        """The target holds a copy of the student's trainable parameters only (with a LoRA student: its
        adapters, the base is shared) and runs as the student with them swapped in (`target_velocity`). Made on
        first use when the student was built without make_student (LoRA); a loaded state is applied here."""
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        if self.target is None or list(self.target) != names:
            params = dict(student.named_parameters())
            self.target = {n: params[n].detach().clone() for n in names}
        self._apply_pending_target()

    def _apply_pending_target(self):
        """Copy a loaded target (load_state_dict) into the live one once both exist with the same names."""
        if (self.target is not None and self._pending_target is not None
                and self._pending_target.keys() == self.target.keys()):
            for n, t in self._pending_target.items():
                self.target[n].copy_(t)
            self._pending_target = None

    def target_velocity(self, student):
        """v of the target network: the student's module with the target's parameters (torch.func)."""
        def velocity(x, s, c):
            return torch.func.functional_call(student, self.target, (), self._velocity_kwargs(x, s, c))
        return velocity

    @staticmethod
    def _tuple_first(velocity):
        return lambda x, s, c: velocity(x, s, c)[0]

    @staticmethod
    def _velocity_kwargs(x, sigma, cond):
        return {"hidden_states": x, "timestep": (sigma * 1000).float().expand(x.shape[0]),
                "encoder_hidden_states": cond["encoder_hidden_states"],
                "pooled_projections": cond["pooled_projections"], "return_dict": False}

    @torch.no_grad()
    def after_step(self, student, step):
        """Target EMA: theta- <- d theta- + (1 - d) theta (decay 0.9, SCFlow's target network)."""
        self._sync_target(student)
        d = self.options["target_decay"]
        params = dict(student.named_parameters())
        for name, p in self.target.items():
            p.lerp_(params[name].detach().to(p.dtype), 1 - d)

    def state_dict(self):
        if self._pending_target is not None:
            return {"target": self._pending_target}
        return {"target": {k: v.detach().clone() for k, v in self.target.items()}} if self.target else {}

    def load_state_dict(self, state):
        if "target" not in state:
            return
        self._pending_target = dict(state["target"])
        self._apply_pending_target()

    # --- GAN on the one-step output: the shared discriminator and hinge losses (pipeline/methods/discriminator.py)
    def discriminator(self):
        if self.options["lambda_gan"] <= 0:
            return None
        if self._disc is None:
            adv = self.ctx.cfg.train.adversarial
            self._disc = TransformerDiscriminator(self.ctx.teacher.transformer, adv.disc_blocks, adv.spectral_norm,
                                                  adv.disc_backbone).to(self.ctx.device)
        return self._disc

    # --- one step
    @torch.no_grad()
    def draw(self, step, rows):
        n = self.ctx.cfg.train.batch_size
        seg = rows.segments(n)
        t, z_t = on_trajectory_points(seg, self.ctx.cfg.schedule.shift, rows.rng)
        out = {"z_t": z_t, "t": t, "k": seg["k"], "z_end": seg["z_end"], "cond": seg["cond"],
               "guidance": seg["guidance"], "z1": torch.randn(z_t.shape, generator=rows.rng)}
        if self.discriminator() is not None:
            if rows.has_real_data():          # SCFlow's GAN sees real data: digits or the run's image latents
                out["real_rows"] = rows.real(n)
            else:                             # no real set (byo/sd3 without data.images): cached final samples
                real = rows.segments(n, window_probs=[0.0] * (len(self.ctx.edges) - 2) + [1.0])
                out.update(real=real["z_end"], real_cond=real["cond"])
        return out

    def complete(self, drawn):
        drawn["null_cond"] = self.ctx.solves.null_cond(len(drawn["t"]))
        if "real_rows" in drawn:
            real = self.ctx.solves.real_rows(drawn.pop("real_rows"))
            drawn.update(real=real["x0"], real_cond=real["cond"])
        return drawn

    @torch.no_grad()
    def _final_states(self, z_end, k, cond, guidance, need):
        """Each needed row's final cached state: its segment end in the last window, else the teacher rolled
        on from there through the remaining windows (deterministic, so it reproduces the cached state)."""
        z0 = z_end.clone()
        for j in range(int(k[need].min()) + 1, len(self.ctx.edges) - 1):
            rows = need & (k < j)                  # rows whose trajectory still has window j to go
            sub = {c: v[rows] for c, v in cond.items()}
            z0[rows] = self.ctx.solves.teacher_window(z0[rows], j, sub, guidance[rows])
        return z0

    def generator_losses(self, student, batch, step):
        self._sync_target(student)
        o, vel = self.options, lambda m: (lambda x, s, c: self.velocity(m, x, s, c))
        z_t, t, cond, w = batch["z_t"], batch["t"], batch["cond"], batch["guidance"]
        with torch.no_grad():
            g = self.ctx.step_rng
            u1, u2 = uniform(len(t), g, t), uniform(len(t), g, t)
            dn, up = u1 * torch.clamp(t, max=o["delta"]), u2 * torch.clamp(1 - t, max=o["delta"])
            v_T = guided(self.ctx.teacher.velocity, batch["null_cond"], w)(z_t, t, cond)
            z_m, z_p = z_t - rowwise(dn, z_t) * v_T, z_t + rowwise(up, z_t) * v_T
            tgt = consistency(self._tuple_first(self.target_velocity(student)), torch.cat([z_m, z_p]), torch.cat([t - dn, t + up]),
                              {k: torch.cat([v, v]) for k, v in cond.items()})
            tgt_m, tgt_p = tgt.chunk(2)
            need = (t - dn) < o["tau"]
            if need.any():
                tgt_m = truncated_target(tgt_m, self._final_states(batch["z_end"], batch["k"], cond, w, need),
                                         t - dn, o["tau"])
        f_t = consistency(vel(student), z_t, t, cond)
        losses = {"con": pseudo_huber(f_t, tgt_m, o["huber_c"])}
        total = losses["con"]
        if step > o["warmup_bi"] and o["lambda_bi"] > 0:
            losses["bi"] = pseudo_huber(f_t, tgt_p, o["huber_c"])
            total = total + o["lambda_bi"] * losses["bi"]
        use_rf = step > o["warmup_rf"] and o["lambda_rf"] > 0
        use_gan = step > o["warmup_gan"] and self.discriminator() is not None
        if use_rf or use_gan:
            z1 = batch["z1"]
            ones = torch.ones(len(z1), device=z1.device)
            x0_one = consistency(vel(student), z1, ones, cond)          # one-step output, with grad
            if use_rf:
                losses["rf"] = self.reflow_loss(student, x0_one.detach(), z1, cond)
                total = total + o["lambda_rf"] * losses["rf"]
            if use_gan:
                losses["gan"] = hinge_g_loss(self._disc_logits(x0_one, cond))    # D frozen by the trainer
                total = total + o["lambda_gan"] * losses["gan"]
        losses["loss"] = total
        return losses

    def reflow_loss(self, student, x0_one, z1, cond):
        """L_rf = MSE(f(z~, t), sg(x0_one)), z~ = (1-t) sg(x0_one) + t z1: straightens the student's own pairs."""
        t = uniform(len(z1), self.ctx.step_rng, z1)
        z = (1 - rowwise(t, z1)) * x0_one + rowwise(t, z1) * z1
        return F.mse_loss(consistency(lambda x, s, c: self.velocity(student, x, s, c), z, t, cond), x0_one)

    def _disc_logits(self, x, cond):
        """D on clean samples (sigma = 0): the one-step output is a final sample, as the cached reals are."""
        return self._disc(x, torch.zeros(len(x), device=x.device), cond)

    def discriminator_losses(self, student, batch, step):
        """Hinge D loss: real = real data (or cached final teacher samples), fake = the student's one-step output."""
        if step <= self.options["warmup_gan"] or self.discriminator() is None:
            return None
        with torch.no_grad():      # the trainer runs the D step first, so the fake is made here, without a graph
            ones = torch.ones(len(batch["z1"]), device=batch["z1"].device)
            fake = consistency(lambda x, s, c: self.velocity(student, x, s, c), batch["z1"], ones, batch["cond"])
        d_real, d_fake = self._disc_logits(batch["real"], batch["real_cond"]), self._disc_logits(fake, batch["cond"])
        acc_real, acc_fake = accuracy(d_real.detach(), d_fake.detach())
        # real and fake rows are unpaired here (real data vs the one-step output of other noise): the pair
        # accuracy is then the share of random (real, fake) pairs ranked right, an AUC estimate as flowsteer's
        return {"loss": hinge_d_loss(d_real, d_fake), "logit_real": d_real.mean().detach(),
                "logit_fake": d_fake.mean().detach(), "acc_real": acc_real, "acc_fake": acc_fake,
                "acc_pair": pair_accuracy(d_real.detach(), d_fake.detach())}

    # --- sampling
    @classmethod
    @torch.no_grad()
    def sample(cls, student, noise, cond, nfe, num_windows, shift, callback=None, sigmas=None):
        """Euler with the student velocity on fixed_sigmas(nfe, shift) (or `sigmas`), any nfe (num_windows unused).

        This IS deterministic multistep consistency sampling: with x0^ = f(x_t, t) = x_t - t v and
        eps^ = x_t + (1 - t) v, the re-noised (1 - s) x0^ + s eps^ = x_t + (s - t) v, one Euler step."""
        sigmas = (fixed_sigmas(nfe, shift) if sigmas is None else sigmas).to(noise.device)
        return euler(lambda x, s, c: cls.velocity(student, x, s, c), noise, sigmas, cond, callback)
