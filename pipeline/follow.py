"""Scoring while training (`flowsteer evaluate --follow`), as DMD2's checkpoint watcher does it.

Training commits a checkpoint file and then the segment's completion record (`steps-<step>`, pipeline/runner.py),
so a done record vouches for `checkpoints/step-<step>.pt`. The watcher plans one evaluate unit per (run, vouched
step, schedule, NFE, seed) whose file still exists (training keeps only the newest few), runs the pending ones
like any stage (a unit with a record is never redone), and repeats every `poll` seconds until every run's
`export` record says training finished; the pass after that one scores whatever the last segments left.
The students are the checkpoints' EMA weights (LoRA merged), exactly what `export` would write at that step.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SEGMENT = re.compile(r"steps-(\d+)$")


def vouched_checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of each checkpoint a done segment record vouches for and that is still on disk."""
    from pipeline.runner import read_record, records_dir

    out = []
    for rec in sorted(records_dir(Path(train_dir)).glob("steps-*.json")):
        m = SEGMENT.match(rec.stem)
        r = read_record(Path(train_dir), rec.stem) if m else None
        if r and r.get("status") == "done":
            step = int(m.group(1))
            path = Path(train_dir) / "checkpoints" / f"step-{step:06d}.pt"
            if path.is_file():
                out.append((step, path))
    return out


def training_finished(cfg, methods=None) -> bool:
    """Every run's `export` record is done: training wrote its last checkpoint."""
    from pipeline.runner import is_done

    return all(is_done(cfg.train_dir(r), "export") for r in cfg.train_runs(list(methods) if methods else None))


def checkpoint_student(cfg, run, teacher, path: Path, device):
    """The EMA student of one training checkpoint (LoRA merged), as a pipeline.student.Student."""
    from pipeline.methods import get_method
    from pipeline.methods.base import MethodContext
    from pipeline.schedule import fixed_sigmas
    from pipeline.lora import attach_adapters, lora_host, merged_copy
    from pipeline.student import Student

    state = torch.load(path, map_location="cpu", weights_only=True)
    method_cls = get_method(run.method)
    sched = cfg.schedule
    edges = fixed_sigmas(sched.teacher_steps, sched.shift)[::sched.teacher_steps // sched.windows]
    ctx = MethodContext(cfg=cfg, teacher=teacher, rows=None, solves=None, edges=edges.to(device),
                        device=torch.device(device), step_rng=torch.Generator().manual_seed(0),
                        options=dict(run.options))
    net = method_cls(ctx).make_student(teacher.transformer).float()
    lora = cfg.train.student.kind == "lora"
    if lora:                              # the student's adapters on a copy of the teacher (pipeline/lora.py)
        attach_adapters(lora_host(net), cfg.train.student)
    net.load_state_dict(state["student"], strict=not lora)    # a LoRA checkpoint holds the trainable weights only
    if lora:                              # the EMA adapters fused into the base, as the trainer's export does
        net = merged_copy(net, state["ema"])
    else:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name in state["ema"]:
                    p.copy_(state["ema"][name])
    meta = {"method": run.method, "windows": sched.windows, "shift": sched.shift, "step": int(state["step"])}
    return Student(net.to(device).eval().requires_grad_(False), method_cls, meta)


def watch(score_pass: Callable[[], None], finished: Callable[[], bool], poll: float,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Run `score_pass` until a pass that started after training finished; returns the number of passes."""
    passes = 0
    while True:
        done = finished()                 # read before the pass, so the last checkpoints are scored
        score_pass()
        passes += 1
        if done:
            return passes
        print(f"evaluate --follow: waiting {poll:g}s for new checkpoints (Ctrl-C stops)", file=sys.stderr)
        sleep(poll)
