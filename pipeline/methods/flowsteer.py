"""FlowSteer (Ke et al. 2025): OTA + adversarial distillation on the teacher's ODE trajectory.

G loss = L_dist (OTA's chord loss) + lambda_adv L_adv + lambda_fm L_FM, with a hinge GAN whose
  real = the teacher's authentic state at a window end z_e (sigma = s_e), and fake (`fake_source`) =
  one_step: the student's one-step jump from the same authentic window start, z_s + (s_e - s_s) v_theta(z_s, s_s),
            exactly the step the student takes at K-NFE inference from a teacher state; feature matching is
            then a paired perceptual loss (real and fake share their start): sum_l ||D_l(z_e) - D_l(fake)||^2;
  rollout:  the student's OWN K-step sampler from fresh noise up to edge k+1 (the earlier steps without a
            graph, the last one with it), so D sees the states the student reaches at inference, with its own
            errors carried from window to window (the inter-segment mismatch); unpaired with the real state,
            so feature matching compares batch means of D's features (Salimans et al. 2016).
Adversarial rows are resampled from OTA's batch so their windows follow `window_probs` (default: the
clean_weight rule, the clean end weighted for any number of windows, docs/ablation.md) while the chord loss keeps OTA's uniform windows: flowsteer minus the GAN is
exactly ota. `adv_fraction` (default 1.0: the whole batch size) of a batch's size is drawn for the GAN. Every key of
`train.adversarial` except disc_lr can be overridden per run in the method options (ablation variants).
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.methods.base import MethodOptions, register
from pipeline.methods.common import OnTrajectoryChordMethod, rowwise
from pipeline.methods.discriminator import (TransformerDiscriminator, accuracy, feature_matching_loss, hinge_d_loss,
                                            hinge_g_loss, pair_accuracy)

# train.adversarial keys a run may override (train.method_options.flowsteer or a variant); None = the section's
OVERRIDABLE = ("disc_blocks", "lambda_adv", "lambda_fm", "disc_backbone", "spectral_norm", "fake_source",
               "window_probs", "clean_weight")


class FlowSteerOptions(MethodOptions):
    # share of the batch that gets a student jump + D calls, in (0, 1] (checked with its own message)
    adv_fraction: Any = 1.0
    disc_blocks: Any = None
    lambda_adv: Any = None
    lambda_fm: Any = None
    disc_backbone: Any = None
    spectral_norm: Any = None
    fake_source: Any = None
    window_probs: Any = None
    clean_weight: Any = None


FAKE_SOURCES = ("one_step", "rollout")


def window_emphasis(windows: int, clean_weight: float) -> tuple[float, ...]:
    """p_{K-1} = clean_weight, p_k = (1 - clean_weight) / (K - 1) for k < K - 1; one window: (1.0,)."""
    if windows == 1:
        return (1.0,)
    rest = (1 - clean_weight) / (windows - 1)
    return tuple([rest] * (windows - 1) + [clean_weight])


def window_probs(adv, windows: int) -> tuple[float, ...]:
    """The GAN's window probabilities: the explicit list, or the clean_weight emphasis rule for K windows."""
    return tuple(adv.window_probs) if adv.window_probs is not None else window_emphasis(windows, adv.clean_weight)


def resample_windows(k: torch.Tensor, probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n row indices of a batch, drawn with replacement so that row windows k follow `probs` (renormalised over
    the windows the batch holds); none when the batch holds no row of a window with p > 0 (e.g. probs
    [0, 0, 0, 1] and a batch without a last-window row): the GAN then skips that step."""
    count = torch.bincount(k, minlength=len(probs)).to(torch.float64)
    weights = probs.to(k.device)[k] / count[k]           # every row of window j shares p_j
    if not bool((weights > 0).any()):
        return torch.zeros(0, dtype=torch.long, device=k.device)
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
    description = ("FlowSteer: OTA plus a hinge GAN on the teacher's trajectory states (a discriminator built from "
                   "the teacher's first blocks) and the fixed FlowMatchEuler schedule.")
    Options = FlowSteerOptions
    ladder_rank = 30            # FlowSteer Table 5: + adversarial, + feature matching; then a fake-source variant
    ladder_rows = (("flowsteer-adv", {"lambda_fm": 0.0}), ("flowsteer", {}),
                   ("flowsteer-rollout", {"fake_source": "rollout"}))
    uses_adversarial = True
    graph_calls = 1.5                     # + the GAN rows' student jump and the discriminator blocks after it

    @classmethod
    def adversarial(cls, cfg, options):
        """train.adversarial with this run's overrides (options set to a value other than None)."""
        opts = cls.parse_options(options)
        return cfg.train.adversarial.model_copy(update={k: opts[k] for k in OVERRIDABLE if opts[k] is not None})

    @classmethod
    def check_config(cls, cfg, options) -> None:
        """Before any work (exit 2, nothing written): the window probabilities, fake source and adv_fraction."""
        adv = cls.adversarial(cfg, options)
        probs = adv.window_probs
        if probs is not None and (len(probs) != cfg.schedule.windows or min(probs) < 0 or sum(probs) <= 0):
            raise UserError(f"train.adversarial.window_probs {list(probs)} must be {cfg.schedule.windows} "
                            f"non-negative numbers (one per window of schedule.windows), or null for the "
                            f"clean_weight rule")
        if adv.fake_source not in FAKE_SOURCES:
            raise UserError(f"flowsteer fake_source must be one of {', '.join(FAKE_SOURCES)}, got {adv.fake_source!r}")
        adv_fraction = cls.parse_options(options)["adv_fraction"]
        if not isinstance(adv_fraction, (int, float)) or not 0 < adv_fraction <= 1:
            raise UserError(f"train.method_options.flowsteer.adv_fraction must be in (0, 1], got {adv_fraction!r}")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.check_config(ctx.cfg, ctx.options)
        opts = self.options
        adv = self.adversarial(ctx.cfg, opts)
        probs = torch.tensor(window_probs(adv, ctx.cfg.schedule.windows), dtype=torch.float64)
        self.window_probs = probs / probs.sum()
        self.lambda_adv, self.lambda_fm, self.fake_source = adv.lambda_adv, adv.lambda_fm, adv.fake_source
        # share of the batch size that gets a student jump + D calls (fewer rows: a cheaper, noisier D step)
        self.adv_fraction = float(opts["adv_fraction"])
        transformer = getattr(ctx.teacher, "transformer", None)
        if transformer is None or not hasattr(transformer, "transformer_blocks"):
            raise UserError("flowsteer's discriminator is built from the teacher's SD3 transformer blocks; "
                            "this teacher has no `.transformer` with `transformer_blocks`")
        self.disc = TransformerDiscriminator(transformer, adv.disc_blocks, spectral_norm=adv.spectral_norm,
                                             backbone=adv.disc_backbone).to(ctx.device)

    def discriminator(self) -> torch.nn.Module:
        return self.disc

    def export_meta(self) -> dict:
        return {**super().export_meta(), "fake_source": self.fake_source}

    @torch.no_grad()
    def draw(self, step: int, rows) -> dict:
        batch = super().draw(step, rows)
        n = max(1, round(len(batch["k"]) * self.adv_fraction))
        batch["adv_rows"] = resample_windows(batch["k"], self.window_probs, n, rows.rng)
        if self.fake_source == "rollout":     # the student's rollouts start from fresh noise (batch stream)
            batch["adv_noise"] = rows.noise(n)
        return batch

    def one_step_jump(self, student, z_start, sigma_start, sigma_end, cond) -> torch.Tensor:
        """The student's K-NFE inference step across a window: z_s + (s_e - s_s) v_theta(z_s, s_s)."""
        v = self.velocity(student, z_start, sigma_start, cond)
        return z_start + rowwise(sigma_end - sigma_start, z_start) * v

    @torch.no_grad()
    def rollout_start(self, student, noise, k, cond) -> torch.Tensor:
        """The student's own K-step sampler from noise (edge 0) to edge k of each row, without a graph."""
        edges, z = self.ctx.edges.to(noise.device), noise.clone()
        for j in range(int(k.max()) if len(k) else 0):
            live = k > j
            sub = {c: v[live] for c, v in cond.items()}
            s = edges[j].expand(int(live.sum()))
            z[live] = self.one_step_jump(student, z[live], s, edges[j + 1].expand_as(s), sub)
        return z

    def fake(self, student, batch: dict, adv: dict) -> torch.Tensor:
        """The fake state at each GAN row's window end (with a graph to the student's last step)."""
        if self.fake_source == "rollout":
            if "adv_rollout" not in batch:    # the D step and the G step see the same student: roll out once
                k = batch["k"][batch["adv_rows"]]
                batch["adv_rollout"] = self.rollout_start(student, batch["adv_noise"], k, adv["cond"])
            start = batch["adv_rollout"]
        else:
            start = adv["z_start"]
        return self.one_step_jump(student, start, adv["sigma_start"], adv["sigma_end"], adv["cond"])

    def generator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = super().generator_losses(student, batch, step)
        if not (self.lambda_adv or self.lambda_fm) or not len(batch["adv_rows"]):
            return losses
        adv = take(batch, batch["adv_rows"])
        fake = self.fake(student, batch, adv)
        if self.lambda_fm:
            n = len(fake)
            both = {k: torch.cat([v, v]) for k, v in adv["cond"].items()}
            logits, feats = self.disc(torch.cat([adv["z_end"].to(fake), fake]),
                                      torch.cat([adv["sigma_end"]] * 2), both, return_features=True)
            logits_fake = logits[n:]
            if self.fake_source == "one_step":    # paired: same start, same window
                fm = feature_matching_loss([f[:n] for f in feats], [f[n:] for f in feats])
            else:                                  # unpaired: match the batch means of D's features
                fm = feature_matching_loss([f[:n].mean(0) for f in feats], [f[n:].mean(0) for f in feats])
        else:
            logits_fake = self.disc(fake, adv["sigma_end"], adv["cond"])
            fm = torch.zeros((), device=fake.device)
        g_adv = hinge_g_loss(logits_fake)
        losses["loss"] = losses["loss"] + self.lambda_adv * g_adv + self.lambda_fm * fm
        losses.update(adv=g_adv.detach(), fm=fm.detach())
        return losses

    def discriminator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Hinge D loss on real = teacher window ends vs fake = the student's states (no gradient to the student);
        logs the mean logits and D's accuracy on each side (acc_real: share scored > 0, acc_fake: < 0) and per
        pair (acc_pair: share of rows whose real outscores its fake)."""
        if not len(batch["adv_rows"]):
            return None
        adv = take(batch, batch["adv_rows"])
        with torch.no_grad():   # the trainer runs the D step first, so the fake is made here, without a graph
            fake = self.fake(student, batch, adv)
        n = len(fake)
        both = {k: torch.cat([v, v]) for k, v in adv["cond"].items()}
        logits = self.disc(torch.cat([adv["z_end"].to(fake), fake]), torch.cat([adv["sigma_end"]] * 2), both)
        loss = hinge_d_loss(logits[:n], logits[n:])
        acc_real, acc_fake = accuracy(logits[:n].detach(), logits[n:].detach())
        return {"loss": loss, "logit_real": logits[:n].mean().detach(), "logit_fake": logits[n:].mean().detach(),
                "acc_real": acc_real, "acc_fake": acc_fake, "acc_pair": pair_accuracy(logits[:n].detach(),
                                                                                      logits[n:].detach())}
