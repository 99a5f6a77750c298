"""FlowSteer (Ke et al. 2025): OTA + adversarial distillation on the teacher's ODE trajectory.

G loss = L_dist (OTA's chord loss) + lambda_adv L_adv + lambda_fm L_FM, with a hinge GAN whose
  real = the teacher's authentic window end z_e (at sigma = s_e),
  fake = the student's one-step jump from the same authentic window start, z_s + (s_e - s_s) v_theta(z_s, s_s),
which is exactly the step the student takes at K-NFE inference, so the GAN (and feature matching, a paired
perceptual loss here since real and fake share their start) trains the jump that is actually sampled.
Adversarial rows are resampled from OTA's batch so their windows follow train.adversarial.window_probs
while the chord loss keeps OTA's uniform windows: flowsteer minus the GAN is exactly ota, and the GAN
costs no teacher calls beyond OTA's. Only `method_options.flowsteer.adv_fraction` (default 0.5) of a batch's
size is drawn for the GAN, which bounds its extra student and discriminator work per step.
"""
from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.methods.base import register
from pipeline.methods.discriminator import (TransformerDiscriminator, feature_matching_loss, hinge_d_loss,
                                            hinge_g_loss)
from pipeline.methods.common import OnTrajectoryChordMethod, rowwise


def resample_windows(k: torch.Tensor, probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n row indices of a batch, drawn with replacement so that row windows k follow `probs`."""
    count = torch.bincount(k, minlength=len(probs)).to(torch.float64)
    weights = probs.to(k.device)[k] / count[k]           # every row of window j shares p_j
    return torch.multinomial(weights.to(generator.device), n, replacement=True, generator=generator).to(k.device)


ADV_KEYS = ("z_start", "z_end", "sigma_start", "sigma_end", "cond")


def take(batch: dict, rows: torch.Tensor) -> dict:
    """The adversarial term's rows of a batch (the condition dict included)."""
    return {key: ({c: v[rows] for c, v in batch[key].items()} if key == "cond" else batch[key][rows])
            for key in ADV_KEYS}


@register
class FlowSteer(OnTrajectoryChordMethod):
    """OTA's batch and chord loss (common.OnTrajectoryChordMethod) plus the GAN on the one-step jump.

    The trainer freezes the discriminator during the generator step, so G's loss never trains D."""
    name = "flowsteer"

    def __init__(self, ctx):
        super().__init__(ctx)
        adv = ctx.cfg.train.adversarial
        probs = torch.tensor(adv.window_probs, dtype=torch.float64)
        if len(probs) != self.num_windows or (probs < 0).any() or probs.sum() <= 0:
            raise UserError(f"train.adversarial.window_probs {list(adv.window_probs)} must be {self.num_windows} "
                            f"non-negative numbers (one per window of schedule.windows)")
        self.window_probs = probs / probs.sum()
        self.lambda_adv, self.lambda_fm = adv.lambda_adv, adv.lambda_fm
        # share of the batch that gets a one-step jump + D calls: half keeps the GAN's cost per step small
        self.adv_fraction = float(ctx.options.get("adv_fraction", 0.5))
        if not 0 < self.adv_fraction <= 1:
            raise UserError(f"train.method_options.flowsteer.adv_fraction must be in (0, 1], got {self.adv_fraction}")
        transformer = getattr(ctx.teacher, "transformer", None)
        if transformer is None or not hasattr(transformer, "transformer_blocks"):
            raise UserError("flowsteer's discriminator is built from the teacher's SD3 transformer blocks; "
                            "this teacher has no `.transformer` with `transformer_blocks`")
        self.disc = TransformerDiscriminator(transformer, adv.disc_blocks,
                                             spectral_norm=ctx.options.get("spectral_norm", True)).to(ctx.device)

    def discriminator(self) -> torch.nn.Module:
        return self.disc

    @torch.no_grad()
    def batch(self, step: int) -> dict:
        batch = super().batch(step)
        n = max(1, round(len(batch["k"]) * self.adv_fraction))
        batch["adv_rows"] = resample_windows(batch["k"], self.window_probs, n, self.ctx.generator)
        return batch

    def one_step_jump(self, student, z_start, sigma_start, sigma_end, cond) -> torch.Tensor:
        """The student's K-NFE inference step across a window: z_s + (s_e - s_s) v_theta(z_s, s_s)."""
        v = self.velocity(student, z_start, sigma_start, cond)
        return z_start + rowwise(sigma_end - sigma_start, z_start) * v

    def generator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = super().generator_losses(student, batch, step)
        if not (self.lambda_adv or self.lambda_fm):
            return losses
        adv = take(batch, batch["adv_rows"])
        fake = self.one_step_jump(student, adv["z_start"], adv["sigma_start"], adv["sigma_end"], adv["cond"])
        if self.lambda_fm:
            n = len(fake)
            both = {k: torch.cat([v, v]) for k, v in adv["cond"].items()}
            logits, feats = self.disc(torch.cat([adv["z_end"].to(fake), fake]),
                                      torch.cat([adv["sigma_end"]] * 2), both, return_features=True)
            logits_fake = logits[n:]
            fm = feature_matching_loss([f[:n] for f in feats], [f[n:] for f in feats])
        else:
            logits_fake = self.disc(fake, adv["sigma_end"], adv["cond"])
            fm = torch.zeros((), device=fake.device)
        g_adv = hinge_g_loss(logits_fake)
        losses["loss"] = losses["loss"] + self.lambda_adv * g_adv + self.lambda_fm * fm
        losses.update(adv=g_adv.detach(), fm=fm.detach())
        return losses

    def discriminator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Hinge D loss on real = teacher window ends vs fake = the student's jumps (no gradient to the student)."""
        adv = take(batch, batch["adv_rows"])
        with torch.no_grad():   # the trainer runs the D step first, so the fake is made here, without a graph
            fake = self.one_step_jump(student, adv["z_start"], adv["sigma_start"], adv["sigma_end"], adv["cond"])
        n = len(fake)
        both = {k: torch.cat([v, v]) for k, v in adv["cond"].items()}
        logits = self.disc(torch.cat([adv["z_end"].to(fake), fake]), torch.cat([adv["sigma_end"]] * 2), both)
        loss = hinge_d_loss(logits[:n], logits[n:])
        return {"loss": loss, "logit_real": logits[:n].mean().detach(), "logit_fake": logits[n:].mean().detach()}
