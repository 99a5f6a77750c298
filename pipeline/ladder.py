"""The ablation ladder (FlowSteer Table 5 style) as named training runs, and the `study` preset.

Each row adds one thing to the row above, all trained from ONE trajectory store (docs/ablation.md):
  perflow-diffusers  PeRFlow with its windows on diffusers' default scheduler grid (as users run it today)
  perflow            + the fixed schedule (windows on sigma_i = shift(1 - i/K), ending at 0)
  ota                + Online Trajectory Alignment (authentic teacher states as window starts and ends)
  flowsteer-adv      + adversarial distillation (hinge GAN on the one-step jump, no feature matching)
  flowsteer          + feature matching (train.adversarial.lambda_fm) = the full objective
  flowsteer-rollout  fake states from the student's own K-step rollout instead of the one-step jump
plus scflow and ayf-emd under the same CFG target. The rows are `train.variants` entries, so the fingerprint
of a row is that of its method and options: the `perflow` row IS the plain `perflow` run.
"""
from __future__ import annotations

from typing import Any

from pipeline.methods import ladder_methods

# The rows come from the methods' declared ladder facts (Method.ladder_rank, Method.ladder_rows): a row that
# is not the plain method is a train.variants entry of that method.
LADDER: list[str] = [name for m in ladder_methods() for name, _ in m.runs_on_ladder()]
LADDER_VARIANTS: dict[str, dict[str, Any]] = {name: {"method": m.name, "options": options}
                                              for m in ladder_methods() for name, options in m.runs_on_ladder()
                                              if name != m.name}

# `flowsteer init --preset study`: 3 training seeds x the whole ladder, each student long enough to leave the
# teacher (400 steps, 5x the demo's), on both sampling grids (docs/ablation.md, "The study preset").
PRESETS: dict[str, dict[str, Any]] = {
    "study": {
        "root": "runs/study",
        # the study's teacher and store, pinned: the defaults are sized for the demo, not for the study
        "teacher": {"embedded": {"train_steps": 1000}},
        "generate": {"samples_per_prompt": 64},
        "train": {"methods": LADDER, "variants": LADDER_VARIANTS, "seeds": [0, 1, 2], "steps": 400,
                  "batch_size": 12, "checkpoint_every": 200, "log_every": 20},
        "evaluate": {"nfes": [1, 2, 4], "n_samples": 500, "schedules": ["fixed", "diffusers"]},
    },
    # `--preset exact-study`: the same ladder x 3 seeds on the exact benchmark teacher (docs/teachers.md), whose
    # ODE solution is known: sized for <= 45 minutes on 2 CPU cores with two `ablate --share` processes
    # (measured: docs/ablation.md, "The exact study").
    "exact-study": {
        "root": "runs/exact-study",
        "teacher": {"kind": "exact"},
        "generate": {"samples_per_prompt": 64},
        "train": {"methods": LADDER, "variants": LADDER_VARIANTS, "seeds": [0, 1, 2], "steps": 600,
                  "batch_size": 16, "checkpoint_every": 300, "log_every": 20, "tensorboard": False},
        "evaluate": {"nfes": [1, 2, 4], "n_samples": 500, "schedules": ["fixed", "diffusers"],
                     "features": "pixels"},
    },
}


class LadderError(ValueError):
    """A --rows / --seeds choice that is not part of the ladder or the config (one line)."""


def with_ladder(cfg, rows: list[str] | None = None, seeds: list[int] | None = None):
    """`cfg` training the ladder: train.methods = LADDER (or the chosen `rows`, in ladder order), its variants
    added (the config's own win), train.seeds = `seeds` when given. A row or seed choice changes no run's
    fingerprint, so a partial ablation trains into the same directories as the whole one."""
    from schemas.config import RunConfig

    if rows is not None:
        unknown = [r for r in rows if r not in LADDER]
        if unknown:
            raise LadderError(f"--rows: '{unknown[0]}' is not a ladder row (rows: {', '.join(LADDER)})")
    if seeds is not None and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise LadderError(f"--seeds: {seeds} must be distinct non-negative integers")
    data = cfg.model_dump(mode="json")
    data["train"]["methods"] = [r for r in LADDER if rows is None or r in rows]
    data["train"]["variants"] = {**LADDER_VARIANTS, **data["train"]["variants"]}
    if seeds is not None:
        data["train"]["seeds"] = list(seeds)
    return RunConfig.model_validate(data)


def merged(base: dict, over: dict) -> dict:
    """`base` with `over` laid on it key by key, nested dicts merged (not replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_yaml(name: str, example_text: str) -> str:
    """The example config with the preset laid over it, as YAML (a header says which preset)."""
    import yaml

    from schemas.config import RunConfig

    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    data = merged(yaml.safe_load(example_text), PRESETS[name])
    RunConfig.model_validate(data)
    return (f"# flowsteer preset '{name}' (docs/ablation.md): the example config with the preset's keys set;\n"
            f"# run it with `flowsteer ablate -c <this file>`.\n" + yaml.safe_dump(data, sort_keys=False))
