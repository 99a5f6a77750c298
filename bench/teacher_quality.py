"""Embedded teacher quality: does the digit classifier recognise the prompted digit in teacher samples?

Runs the teacher stage first if it is not done (timed), then samples `--per-digit` images per digit with
`--steps` fixed-schedule Euler steps and CFG, and prints the classifier's held-out accuracy, the teacher's
prompt accuracy (overall and per digit) for each guidance scale, and the time taken.

    .venv/bin/python bench/teacher_quality.py                      # default config (runs/demo)
    .venv/bin/python bench/teacher_quality.py --guidance 1,2,4,6   # compare CFG scales side by side
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.cli import EXAMPLE, run_stage
from pipeline.digits import prompt_for
from pipeline.metrics.classifier import load_classifier
from pipeline.runner import read_record
from pipeline.sampling import sample
from pipeline.schedule import fixed_sigmas
from pipeline.teachers import load_teacher
from schemas.config import load_config


@torch.no_grad()
def prompt_accuracy(teacher, classifier, labels: torch.Tensor, steps: int, shift: float, guidance: float,
                    seed: int = 0, batch: int = 250) -> torch.Tensor:
    """Per-sample hit (classifier says the prompted digit) for Euler + CFG samples from fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), *teacher.sample_shape, generator=gen)
    sigmas = fixed_sigmas(steps, shift)
    hits = []
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        cond = teacher.encode([prompt_for(l) for l in lab])
        null = teacher.encode([""] * len(lab))
        x = sample(teacher.velocity, noise[i:i + batch].to(teacher.device), sigmas, cond, null, guidance)
        hits.append(classifier.predict(teacher.decode(x)).cpu() == lab)
    return torch.cat(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=EXAMPLE)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--per-digit", type=int, default=100)
    ap.add_argument("--guidance", type=str, default=None, help="comma-separated CFG scales (default evaluate.guidance)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the sampling part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    out = cfg.stage_dir("teacher")
    t0 = time.time()
    run_stage("teacher", cfg)
    stage_wall = time.time() - t0
    recs = {k: read_record(out, k) for k in ("classifier", "teacher")}
    unit_seconds = {k: r.get("seconds") for k, r in recs.items() if r}
    clf_info = json.loads((out / "classifier.json").read_text())

    teacher = load_teacher(cfg)
    classifier = load_classifier(out, teacher.device)
    labels = torch.arange(10).repeat_interleave(args.per_digit)
    scales = [float(g) for g in args.guidance.split(",")] if args.guidance else [cfg.evaluate.guidance]

    print(f"teacher dir: {out}")
    print(f"teacher stage: {stage_wall:.1f}s wall this call; unit seconds when they ran: {unit_seconds} "
          f"(total {sum(v for v in unit_seconds.values() if v):.1f}s)")
    print(f"classifier held-out accuracy: {clf_info['held_out_accuracy']:.2%} on {clf_info['held_out_digits']} digits")
    print(f"teacher prompt accuracy, {args.steps} fixed-schedule Euler steps (shift {cfg.schedule.shift}), "
          f"{len(labels)} samples:")
    header = "guidance  overall  " + "  ".join(f"{d:>4d}" for d in range(10)) + "   seconds"
    print(header)
    for w in scales:
        t1 = time.time()
        hits = prompt_accuracy(teacher, classifier, labels, args.steps, cfg.schedule.shift, w)
        per = hits.view(10, -1).float().mean(1)
        print(f"{w:8.2f}  {hits.float().mean():7.2%}  " + "  ".join(f"{p:4.0%}" for p in per) +
              f"   {time.time() - t1:7.1f}", flush=True)


if __name__ == "__main__":
    main()
