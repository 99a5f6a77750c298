"""Does the schedule matter? The embedded teacher sampled with diffusers' default grid vs the fixed grid.

For each N in --steps and each schedule, --n images (the ten digit prompts in turn, the same noise for every
N and schedule) are sampled with Euler + CFG at evaluate.guidance and scored by the digit classifier:
accuracy of the prompted digit, and the Frechet distance in the classifier's feature space to the 5000 real
digits. Also printed: each grid's last two step sizes (the default's last model call moves by ~0.009).
This is flowsteer's reproduction of FlowSteer's scheduler finding on a teacher we can train on CPU.

    .venv/bin/python bench/schedule_effect.py [--config runs.yaml] [--n 1000] [--steps 2,4,8,32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import EXAMPLE  # noqa: E402
from schemas.config import load_config  # noqa: E402

NOISE_SEED_OFFSET = 1 << 41     # bench noise never coincides with training or evaluation seeds


@torch.no_grad()
def sample_images(teacher, sigmas, prompts, noise_seeds, guidance, batch_size):
    from pipeline.sampling import sample
    from pipeline.seeds import noise_for

    out = []
    for i in range(0, len(prompts), batch_size):
        p, seeds = prompts[i:i + batch_size], noise_seeds[i:i + batch_size]
        noise = torch.stack([noise_for(int(s), teacher.sample_shape) for s in seeds]).to(teacher.device)
        x = sample(teacher.velocity, noise, sigmas, teacher.encode(p), teacher.encode([""] * len(p)), guidance)
        out.append(teacher.decode(x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def features(clf, images01, batch_size):
    return torch.cat([clf.features(images01[i:i + batch_size]).cpu() for i in range(0, len(images01), batch_size)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="run config (default: the packaged example)")
    ap.add_argument("--n", type=int, default=1000, help="images per (N, schedule); prompts cycle over the digits")
    ap.add_argument("--steps", default="2,4,8,32", help="comma-separated step counts N")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pipeline.digits import DIGIT_PROMPTS, load_digits
    from pipeline.metrics.classifier import load_classifier
    from pipeline.metrics.frechet import frechet_from_features
    from pipeline.schedule import make_sigmas
    from pipeline.teachers import load_teacher

    cfg = load_config(args.config or EXAMPLE)
    if cfg.teacher.kind != "embedded":
        sys.exit("error: this bench scores digits: it needs the embedded teacher (teacher.kind: embedded)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = load_teacher(cfg)
    clf = load_classifier(cfg.stage_dir("teacher"), teacher.device)
    bs, w, shift = cfg.evaluate.batch_size, cfg.evaluate.guidance, cfg.schedule.shift
    steps = [int(s) for s in args.steps.split(",")]

    labels = torch.arange(args.n) % len(DIGIT_PROMPTS)
    prompts = [DIGIT_PROMPTS[int(y)] for y in labels]
    seeds = NOISE_SEED_OFFSET + args.seed * (1 << 24) + torch.arange(args.n)
    real = features(clf, (load_digits()[0] + 1) / 2, bs)
    print(f"teacher {cfg.stage_dir('teacher')}  shift {shift}  CFG {w}  n {args.n} per cell  "
          f"(real digits: {len(real)}; classifier features: {real.shape[1]})")

    header = f"{'N':>3} {'schedule':8s} {'accuracy':>8s} {'FD':>8s} {'last step':>9s} {'step before':>11s} {'sec':>6s}"
    print(header + "\n" + "-" * len(header))
    rows = {}
    for n in steps:
        for kind in ("diffusers", "fixed"):
            sigmas = make_sigmas(n, shift, kind)
            t0 = time.time()
            images = sample_images(teacher, sigmas, prompts, seeds, w, bs)
            acc = clf.accuracy(images, labels, bs)
            fd = frechet_from_features(features(clf, images, bs).numpy(), real.numpy())
            d = (sigmas[:-1] - sigmas[1:]).tolist()
            before = f"{d[-2]:11.4f}" if n > 1 else f"{'-':>11s}"
            rows[n, kind] = (acc, fd)
            print(f"{n:3d} {kind:8s} {acc:8.3f} {fd:8.2f} {d[-1]:9.4f} {before} {time.time() - t0:6.1f}", flush=True)
    print("\nfixed vs default (accuracy difference, FD ratio default/fixed):")
    for n in steps:
        (a_d, f_d), (a_f, f_f) = rows[n, "diffusers"], rows[n, "fixed"]
        print(f"  N={n:<3d} accuracy {a_f - a_d:+.3f}   FD x{f_d / max(f_f, 1e-12):.2f}")
    for n in (n for n in steps if n <= 8):
        grid = {k: [round(s, 4) for s in make_sigmas(n, shift, k).tolist()] for k in ("diffusers", "fixed")}
        print(f"  sigmas N={n}: default {grid['diffusers']}  fixed {grid['fixed']}")


if __name__ == "__main__":
    main()
