"""Train step time, measured side by side in one run: OTA from cached segments vs PeRFlow vs OTA online.

    python bench/train_step.py [--config run.yaml] [--rounds 6] [--threads 2]

Targets: OTA (cached segments, train.online_fraction) <= 1.3x PeRFlow's step; OTA with every start point
rolled out online (online_fraction=1.0) shows what the cache saves; data wait (reading cached / real
data) <= 5% of the step. Steps of the variants are interleaved round by round so machine load hits all
alike. Uses the embedded teacher of the config when `flowsteer teacher` has run, else the toy teacher.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.cli import EXAMPLE, run_stage  # noqa: E402
from schemas.config import load_config  # noqa: E402


def pick_config(path: str | None):
    cfg = load_config(path or EXAMPLE)
    if cfg.teacher.kind != "embedded" or (cfg.stage_dir("teacher") / "transformer").is_dir():
        return cfg, "config"
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    (tmp / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    toy = {"root": str(tmp / "runs"), "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher"},
           "generate": {"prompts": str(tmp / "prompts.txt"), "samples_per_prompt": 32, "shard_size": 32},
           "train": {"batch_size": cfg.train.batch_size, "adversarial": {"disc_blocks": 1}}}
    import yaml

    (tmp / "toy.yaml").write_text(yaml.safe_dump(toy))
    return load_config(tmp / "toy.yaml"), "toy teacher (no embedded teacher trained yet)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, which = pick_config(args.config)
    run_stage("generate", cfg, "local")           # cached: a no-op when the store is already there

    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from stages.train import open_store

    teacher, store = load_teacher(cfg), open_store(cfg)
    frac = cfg.train.online_fraction
    variants = {"perflow": ("perflow", frac), "ota cache only": ("ota", 0.0),
                f"ota online {frac:g}": ("ota", frac), "ota online 1.0": ("ota", 1.0)}
    trainers = {}
    for name, (method, f) in variants.items():
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"online_fraction": f})})
        trainers[name] = Trainer(c, method, teacher, store, cfg.device)
        trainers[name].train_step()               # warm-up (allocations, caches)
    times = {n: [] for n in variants}
    waits = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, tr in trainers.items():
            w0, t0 = tr.data.wait_seconds, time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
            waits[name].append(tr.data.wait_seconds - w0)
    base = statistics.median(times["perflow"])
    print(f"train step bench: {which}; teacher {cfg.teacher.kind}, sample {tuple(teacher.sample_shape)}, "
          f"batch {cfg.train.batch_size}, M={cfg.schedule.teacher_steps}, K={cfg.schedule.windows}, "
          f"{args.rounds} interleaved rounds, {args.threads} threads")
    print(f"{'variant':22s} {'median step s':>13s} {'x perflow':>10s} {'data wait':>10s}")
    for name in variants:
        med = statistics.median(times[name])
        wait = sum(waits[name]) / sum(times[name])
        print(f"{name:22s} {med:13.3f} {med / base:10.2f} {100 * wait:9.1f}%")
    cached = statistics.median(times[f"ota online {frac:g}"])
    online = statistics.median(times["ota online 1.0"])
    print(f"OTA (cache + {frac:g} online) / PeRFlow = {cached / base:.2f}x (target <= 1.3x); "
          f"all-online / cached OTA = {online / cached:.2f}x (the cache's saving)")


if __name__ == "__main__":
    main()
