"""Train step time, measured side by side in one run: OTA from cached segments vs PeRFlow vs OTA online.

    python bench/train_step.py [--config run.yaml] [--rounds 6] [--threads 2]

Targets: OTA (cached segments, train.online_fraction) <= 1.3x PeRFlow's step; OTA with every start point
rolled out online (online_fraction=1.0) shows what the cache saves; data wait (reading cached / real
data) <= 5% of the step. Steps of the variants are interleaved round by round so machine load hits all
alike. Uses the config's teacher; an untrained embedded teacher is replaced by a random-init one of its shape.
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
    """The config as given when its teacher exists; else the same config on a random-init embedded teacher.

    Step time does not depend on the teacher's weights, so an untrained network of the embedded shape
    (saved where `flowsteer teacher` would put it, under a temp root) times exactly like the trained one."""
    cfg = load_config(path or EXAMPLE)
    if cfg.teacher.kind != "embedded" or (cfg.stage_dir("teacher") / "transformer").is_dir():
        return cfg, "trained teacher"
    from pipeline.teachers.embedded import make_transformer, save_model_dir

    root = Path(tempfile.gettempdir()) / "flowsteer-bench-train"     # stable: reruns reuse its store
    gen = cfg.generate.model_copy(update={"samples_per_prompt": 16, "shard_size": 32})
    cfg = cfg.model_copy(update={"root": str(root), "generate": gen})
    save_model_dir(make_transformer(cfg.teacher.embedded), cfg.stage_dir("teacher") / "transformer")
    return cfg, "random-init teacher of the embedded shape (no trained teacher yet; timings only)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, help="train.batch_size (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, which = pick_config(args.config)
    if args.batch:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": args.batch})})
    run_stage("generate", cfg, "local")           # cached: a no-op when the store is already there

    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from stages.train import open_store

    teacher, store = load_teacher(cfg), open_store(cfg)
    frac = cfg.train.online_fraction
    variants = {"perflow": ("perflow", frac), "ota cache only": ("ota", 0.0),
                f"ota online {frac:g}": ("ota", frac), "ota online 1.0": ("ota", 1.0),
                f"flowsteer online {frac:g}": ("flowsteer", frac)}
    trainers = {}
    for name, (method, f) in variants.items():
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"online_fraction": f})})
        trainers[name] = Trainer(c, method, teacher, store, cfg.device)
        trainers[name].train_step()               # warm-up (allocations, caches)
    # The unit everything is priced in: one no-grad teacher forward at batch 128 (the lead's ~0.15 s idle).
    ref_x = torch.randn(128, *teacher.sample_shape)
    ref_cond = {k: v[:1].expand(128, *v.shape[1:]) for k, v in store.cond([0]).items()}
    times = {n: [] for n in variants}
    ref = []
    waits = {n: [] for n in variants}
    for _ in range(args.rounds):
        with torch.no_grad():
            t0 = time.perf_counter()
            teacher.velocity(ref_x, torch.full((128,), 0.5), ref_cond)
            ref.append(time.perf_counter() - t0)
        for name, tr in trainers.items():
            w0, t0 = tr.loader.wait_seconds, time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t0)
            waits[name].append(tr.loader.wait_seconds - w0)
    base = statistics.median(times["perflow"])
    print(f"train step bench: {which}; teacher {cfg.teacher.kind}, sample {tuple(teacher.sample_shape)}, "
          f"batch {cfg.train.batch_size}, M={cfg.schedule.teacher_steps}, K={cfg.schedule.windows}, "
          f"{args.rounds} interleaved rounds, {args.threads} threads")
    fwd = statistics.median(ref)
    print(f"teacher forward (no grad, batch 128): {fwd:.3f} s median")
    print(f"{'variant':22s} {'median step s':>13s} {'x perflow':>10s} {'x forward':>10s} {'data wait':>10s}")
    for name in variants:
        med = statistics.median(times[name])
        wait = sum(waits[name]) / sum(times[name])
        print(f"{name:22s} {med:13.3f} {med / base:10.2f} {med / fwd:10.1f} {100 * wait:9.1f}%")
    cached = statistics.median(times[f"ota online {frac:g}"])
    online = statistics.median(times["ota online 1.0"])
    print(f"OTA (cache + {frac:g} online) / PeRFlow = {cached / base:.2f}x (target <= 1.3x); "
          f"all-online / cached OTA = {online / cached:.2f}x (the cache's saving)")


if __name__ == "__main__":
    main()
