"""Peak RSS of one training step on the CPU, full vs LoRA student, next to `flowsteer plan`'s prediction.

    python bench/memory_plan.py [--layers 12] [--heads 12] [--head-dim 64] [--size 32] [--batch 2] [--method ota]
    python bench/memory_plan.py --shapes      # the plan for SD3-Medium, SD3.5-Large, Flux-dev on 80 GB GPUs

An SD3-shaped toy teacher (pipeline/teachers/toy.py, random init) of `layers` blocks, heads x head_dim wide,
on size x size x 4 latents (patch 2); a 3-prompt store is generated once, then each mode trains one step in a
fresh child process (prefetch 0) for two steps (the second is the steady state: AdamW's state exists
through its forward and backward). Measured: the child's peak RSS (ru_maxrss) minus its RSS after imports and
the store opened; predicted: the plan's per-device total for the same config (pipeline/plan.py). Target: the
prediction within 25% of the measurement.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def write_cfg(root: Path, args, kind: str) -> Path:
    from conftest import deep_merge, toy_sections, write_config

    sections = deep_merge(toy_sections(root), {
        "teacher": {"kwargs": {"sample_size": args.size, "channels": 4, "layers": args.layers, "heads": args.heads,
                               "head_dim": args.head_dim, "weak": False}},
        "schedule": {"teacher_steps": 4, "windows": 2},
        "generate": {"samples_per_prompt": 1, "shard_size": 3, "batch_size": 3},
        "train": {"methods": [args.method], "batch_size": args.batch, "steps": 1, "prefetch": 0,
                  "tensorboard": False, "student": {"kind": kind, "rank": 16}}})
    return write_config(root / f"{kind}.yaml", **sections)


def child(path: str) -> None:
    import psutil
    import torch

    torch.set_num_threads(2)
    from pipeline.lora import footprint
    from pipeline.plan import config_teacher, plan
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from schemas.config import load_config
    from stages.train import open_store

    cfg = load_config(path)
    method = cfg.train.methods[0]
    lines = plan(cfg, config_teacher(cfg), method, 1)
    mode = "lora" if cfg.train.student.kind == "lora" else "full/ddp"
    predicted = next(ln for ln in lines if ln.mode == mode)
    store = open_store(cfg)
    base = psutil.Process().memory_info().rss
    trainer = Trainer(cfg, method, load_teacher(cfg), store, "cpu")
    for _ in range(2):                    # the second step holds the optimiser state through forward and backward
        trainer.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "measured": peak - base, "predicted": predicted.total,
                      "parts": predicted.parts,
                      **footprint(trainer.student, trainer.param_names, trainer.opt)}))
    trainer.close()


def shapes() -> None:
    from pipeline.plan import plan, render, shape_teacher
    from schemas.config import RunConfig

    cfg = RunConfig.model_validate({"device": "cuda", "teacher": {"dtype": "bfloat16"},
                                    "train": {"mixed_precision": "bf16", "student": {"kind": "lora", "rank": 64}}})
    for name in ("sd3-medium", "sd3.5-large", "flux-dev"):
        teacher = shape_teacher(name, 1024)
        print(render(plan(cfg, teacher, "ota", gpus=8, batch_size=8), 80.0,
                     f"\n{name}: {teacher.params / 1e9:.2f} B, ota, 1024 px, 1 row per GPU, 8 GPUs, bf16, LoRA r64"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--method", default="ota")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.shapes:
        return shapes()
    from pipeline.cli import run_stage
    from schemas.config import load_config

    root = Path(tempfile.mkdtemp(prefix="memory_plan-"))
    run_stage("generate", load_config(write_cfg(root, args, "full")), "local")
    print(f"student {args.layers} blocks x {args.heads * args.head_dim} wide, {args.size}x{args.size}x4 latents, "
          f"batch {args.batch}, {args.method}")
    print(f"{'mode':<10}{'trained params':>16}{'optimizer MB':>14}{'measured GB':>13}{'plan GB':>9}{'plan/meas':>11}")
    for kind in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", str(write_cfg(root, args, kind))],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{r['mode']:<10}{r['trainable_params']:>16,}{r['optimizer_bytes'] / 1e6:>14.1f}"
              f"{r['measured'] / 1e9:>13.2f}{r['predicted'] / 1e9:>9.2f}{r['predicted'] / r['measured']:>11.2f}")
        print("    plan parts GB: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["parts"].items() if v))


if __name__ == "__main__":
    main()
