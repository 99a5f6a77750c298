"""Robust trajectory metrics: per-sample errors to a target from the same noise and prompt, summarised by their
median and 90th percentile, plus how often the student lands in another mode than the target (mode switches)
and the error over the samples that do not switch.

Why not the mean alone: a few samples that land in another mode (another digit, another object) have errors
one or two orders of magnitude above the rest, so the mean squared error is mostly the switch rate times the
distance between modes and hides how closely the student follows the trajectory when it does follow it
(docs/metrics.md). Two targets:
- `fidelity_*` / `mode_switch`: the teacher's own evaluate.teacher_nfe-step output (teacher/outputs, every
  teacher; `fidelity_mse` in pipeline/metrics/fidelity.py is their mean);
- `exact_*`: the exact ODE endpoint (the exact benchmark teacher only: its guided ODE solved by fine RK4,
  pipeline/teachers/exact.py); the teacher itself is scored there too (its discretisation error).
A sample's mode: the exact teacher's nearest mixture mode, the embedded teacher's digit classifier, else (with
evaluate.clip_path) the prompt of the run's prompt set that CLIP places nearest; other runs have no modes and
no switch metrics. The per-sample errors and modes of every unit are kept in <evaluate>/per_sample/<unit>.npz.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from pipeline.files import atomic_write_bytes
from pipeline.metrics.base import EvalContext, Samples, register
from pipeline.metrics.fidelity import TargetError, per_sample_mse

UPPER_QUANTILE = 0.9


def has_modes(cfg) -> bool:
    return cfg.teacher.kind in ("exact", "embedded") or bool(cfg.evaluate.clip_path)


@torch.no_grad()
def modes_of(ctx: EvalContext, x: torch.Tensor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
    """[N] integer mode of each sample (comparable between units of one run), or None when the run has none."""
    cfg = ctx.cfg
    if cfg.teacher.kind == "exact":
        return ctx.teacher.modes_of(x).long()
    if cfg.teacher.kind == "embedded":
        clf = ctx.classifier()
        return torch.cat([clf.predict(images[i:i + 500]).cpu() for i in range(0, len(images), 500)]).long()
    if cfg.evaluate.clip_path:
        return clip_nearest_prompt(ctx, images, prompts)
    return None


@torch.no_grad()
def clip_nearest_prompt(ctx: EvalContext, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Index (into the unit's distinct prompts, in first-seen order) of the prompt whose CLIP text embedding is
    nearest each image's: a prompt-set "class" for teachers without a classifier."""
    from pipeline.metrics.alignment import ClipScorer
    from pipeline.metrics.base import clip_embeds

    scorer = ctx.shared("clip", lambda: ClipScorer(ctx.cfg.evaluate.clip_path, ctx.device))
    distinct = list(dict.fromkeys(prompts))
    text = scorer.processor(text=distinct, return_tensors="pt", padding=True, truncation=True)
    txt = clip_embeds(scorer.model.get_text_features(input_ids=text["input_ids"].to(ctx.device),
                                                     attention_mask=text["attention_mask"].to(ctx.device)))
    txt = torch.nn.functional.normalize(txt, dim=-1)
    out = []
    for i in range(0, len(images), 64):
        imgs = images[i:i + 64].float().clamp(0, 1)
        imgs = imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs
        pix = scorer.processor(images=list(imgs.cpu()), return_tensors="pt", do_rescale=False)["pixel_values"]
        img = clip_embeds(scorer.model.get_image_features(pixel_values=pix.to(ctx.device)))
        img = torch.nn.functional.normalize(img, dim=-1)
        out.append((img @ txt.T).argmax(1).cpu())
    return torch.cat(out).long()


def exact_targets(ctx: EvalContext, samples: Samples) -> torch.Tensor:
    """The exact ODE endpoints of this unit's noise and prompts at evaluate.guidance (cached per seed)."""
    def build():
        from pipeline.seeds import noise_for

        teacher, ev = ctx.teacher, ctx.cfg.evaluate
        out = []
        for i in range(0, len(samples.noise_seeds), ev.batch_size):
            seeds = samples.noise_seeds[i:i + ev.batch_size].tolist()
            noise = noise_for(seeds, tuple(teacher.sample_shape)).to(ctx.device)
            cond = teacher.encode(samples.prompts[i:i + len(seeds)])
            null = teacher.encode([""] * len(seeds))
            out.append(teacher.exact_endpoints(noise, cond, null, ev.guidance, shift=ctx.cfg.schedule.shift).cpu())
        return torch.cat(out)
    return ctx.shared(f"exact_seed{samples.seed}_n{len(samples.noise_seeds)}", build)


def unit_errors(ctx: EvalContext, samples: Samples, target: str) -> dict | None:
    """{"err": [N] squared errors, "switched": [N] bool or None} of one unit against `target` ("teacher" |
    "exact"), computed once per unit and target (every metric of the family reads the same arrays) and written
    to <evaluate>/per_sample/<unit>.npz with the modes; None where the target is the sample itself."""
    if target == "teacher" and samples.kind == "teacher":
        return None
    key = f"errors:{samples.key}:{target}"
    cache = ctx._shared
    if key in cache:
        return cache[key]
    for old in [k for k in cache if k.startswith("errors:") and f":{samples.key}:" not in k]:
        del cache[old]                        # one unit at a time: workers score many units
    ref = (ctx.teacher_outputs(samples.seed, samples.noise_seeds) if target == "teacher"
           else exact_targets(ctx, samples))
    err = per_sample_mse(samples.x, ref)
    mine = modes_of(ctx, samples.x, samples.images, samples.prompts)
    theirs = None
    if mine is not None:
        theirs = modes_of(ctx, ref, ctx.teacher.decode(ref.to(ctx.device)).float().cpu(), samples.prompts)
    out = {"err": err, "switched": None if mine is None else (mine != theirs)}
    cache[key] = out
    _keep(ctx, samples, target, err, mine, theirs)
    return out


def _keep(ctx, samples, target, err, mine, theirs) -> None:
    path = ctx.root / "per_sample" / f"{samples.key}_{target}.npz"
    arrays = {"err": err.numpy(), "noise_seeds": samples.noise_seeds}
    if mine is not None:
        arrays.update(mode=mine.numpy(), target_mode=theirs.numpy())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


class _Robust(TargetError):
    """One statistic of a unit's per-sample errors against a target."""

    def stat(self, err: torch.Tensor, switched: torch.Tensor | None) -> float | None:
        raise NotImplementedError

    def score(self, samples: Samples) -> float | None:
        e = unit_errors(self.ctx, samples, self.target)
        return None if e is None else self.stat(e["err"], e["switched"])


class _Median(_Robust):
    def stat(self, err, switched):
        return float(err.median())


class _Mean(_Robust):
    def stat(self, err, switched):
        return float(err.mean())


class _Upper(_Robust):
    def stat(self, err, switched):
        return float(torch.quantile(err.double(), UPPER_QUANTILE))


class _Switch(_Robust):
    digits, exponent_below = 3, 0.0
    when = "a mode per sample: the exact or embedded teacher, or evaluate.clip_path"
    min_samples = 100

    @classmethod
    def applies(cls, cfg) -> bool:
        return has_modes(cfg)

    def stat(self, err, switched):
        return None if switched is None else float(switched.float().mean())


class _Kept(_Switch):
    digits, exponent_below = 4, 1e-3

    def stat(self, err, switched):
        if switched is None or bool(switched.all()):
            return None
        return float(err[~switched].mean())


def _declare(stat: tuple[type, ...], name: str, title: str, order: int, description: str) -> type:
    """Register the metric `name`: the statistic (and target) of the classes `stat`, with the report's title,
    position and one-line description."""
    facts = {"name": name, "title": title, "order": order, "description": description, "__module__": __name__}
    return register(type("".join(word.title() for word in name.split("_")), stat, facts))


class _Exact:
    target = "exact"
    needs = ("the exact teacher",)
    when = "teacher.kind: exact"

    @classmethod
    def applies(cls, cfg) -> bool:
        return cfg.teacher.kind == "exact"


# Against the teacher's output from the same noise and prompt (the mean is fidelity.FidelityMSE).
FidelityMedian = _declare(
    (_Median,), "fidelity_median", "Trajectory fidelity, median squared error", 41,
    "Median over samples of the mean squared distance between the student's output and the teacher's from the "
    "same noise and prompt: how closely a typical sample follows the trajectory.")
FidelityUpper = _declare(
    (_Upper,), "fidelity_p90", "Trajectory fidelity, 90th percentile", 42,
    "90th percentile over samples of that squared distance: the tail a mean folds in.")
ModeSwitch = _declare(
    (_Switch,), "mode_switch", "Mode switches vs the teacher", 43,
    "Share of samples whose mode (class, digit, or CLIP-nearest prompt) differs from the teacher's output from "
    "the same noise and prompt.")
FidelityKept = _declare(
    (_Kept,), "fidelity_kept", "Trajectory fidelity without switches (mean)", 44,
    "Mean squared distance to the teacher's output over the samples that stay in the teacher's mode.")

# Against the exact ODE endpoint (the exact teacher only).
ExactMean = _declare(
    (_Exact, _Mean), "exact_mean", "Error to the exact ODE, mean", 45,
    "Mean squared distance between the output and the exact ODE endpoint (fine RK4 of the exact teacher's guided "
    "field) from the same noise and prompt.")
ExactMedian = _declare(
    (_Exact, _Median), "exact_median", "Error to the exact ODE, median", 46,
    "Median over samples of the squared distance to the exact ODE endpoint.")
ExactUpper = _declare(
    (_Exact, _Upper), "exact_p90", "Error to the exact ODE, 90th percentile", 47,
    "90th percentile over samples of the squared distance to the exact ODE endpoint.")
ExactSwitch = _declare(
    (_Exact, _Switch), "exact_switch", "Mode switches vs the exact ODE", 48,
    "Share of samples whose nearest mixture mode differs from the exact ODE endpoint's.")
ExactKept = _declare(
    (_Exact, _Kept), "exact_kept", "Error to the exact ODE without switches (mean)", 49,
    "Mean squared distance to the exact ODE endpoint over the samples in its mode.")
