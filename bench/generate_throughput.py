"""Generate-stage throughput, measured side by side in one run.

Prints: (1) the share of the pipeline's wall time spent inside teacher forward calls (target >= 0.90 at
batch 64), (2) pipeline samples/s over a bare sampling loop of the same forward calls without runner or
store (target >= 0.90), (3) reading one cached window segment versus regenerating it with the teacher
(target >= 50x cheaper). Teacher: the embedded one when runs/demo has trained it, else the toy teacher at a
bigger size. `--device cuda` runs the teacher in bf16 (a bigger toy config when no embedded teacher).

    python bench/generate_throughput.py [--device cpu|cuda] [--samples N] [--batch 64] [--executor local|ray]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def bench_config(args, root: Path):
    """The embedded default teacher (linked from runs/demo) if trained there, else the toy teacher."""
    from schemas.config import RunConfig

    demo = RunConfig(root=str(args.demo_root))
    gen = {"samples_per_prompt": 1, "shard_size": args.batch, "batch_size": args.batch,
           "cpus_per_worker": args.threads}
    schedule = {"shift": 3.0, "teacher_steps": args.steps, "windows": 4}
    if (demo.stage_dir("teacher") / "transformer").is_dir():
        cfg = RunConfig(root=str(root), device=args.device, schedule=schedule, generate=gen)
        cfg.stage_dir("teacher").parent.mkdir(parents=True, exist_ok=True)
        cfg.stage_dir("teacher").symlink_to(demo.stage_dir("teacher").resolve())
        n_prompts, name = 10, f"embedded ({args.demo_root})"
    else:
        prompts = root / "prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(f"prompt {i}" for i in range(16)) + "\n")
        size = dict(sample_size=64, channels=4, layers=4) if args.device.startswith("cuda") else \
            dict(sample_size=32, channels=4, layers=2)
        cfg = RunConfig(root=str(root), device=args.device, schedule=schedule,
                        generate={**gen, "prompts": str(prompts)},
                        teacher={"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher", "kwargs": size})
        n_prompts, name = 16, f"toy {size}"
    samples = args.samples or (640 if name.startswith("embedded") else 256)
    per_prompt = max(1, -(-samples // n_prompts))
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"samples_per_prompt": per_prompt})})
    return cfg, name


class ForwardClock:
    """Wraps teacher.velocity and adds up the seconds spent inside it (synchronised on CUDA)."""

    def __init__(self, teacher, device):
        self.seconds, self.calls, self.inner = 0.0, 0, teacher.velocity
        self.cuda = str(device).startswith("cuda")
        teacher.velocity = self

    def __call__(self, x, sigma, cond):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        v = self.inner(x, sigma, cond)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return v


def to_bf16(teacher) -> None:
    """bf16 teacher weights; the generate worker casts inputs to teacher.dtype and keeps the ODE in fp32."""
    teacher.transformer.to(torch.bfloat16)
    teacher.dtype = torch.bfloat16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=None,
                    help="default: 640 for the embedded teacher (its default store), 256 for the toy one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="teacher steps M (4 windows)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (= generate.cpus_per_worker)")
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--demo-root", type=Path, default=REPO / "runs" / "demo",
                    help="run root whose trained embedded teacher (default config) is used when present")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    # Process start-up (importing torch / diffusers) is not pipeline work: pay it before any clock starts.
    from diffusers import SD3Transformer2DModel  # noqa: F401

    from pipeline.runner import run_job
    from pipeline.sampling import sample
    from pipeline.datasets import generate_prompts
    from pipeline.seeds import noise_for
    from pipeline.store import TrajectoryStore, generated_store_path
    from pipeline.teachers import load_teacher
    from pipeline.schedule import fixed_sigmas
    from stages.generate import jobs, plan_samples, torch_threads

    with tempfile.TemporaryDirectory() as tmp:
        cfg, name = bench_config(args, Path(tmp))
        [job] = jobs(cfg)
        S = sum(u.size for u in job.units)

        # The bare loop: the same CFG forward calls on the same batches and threads, no runner, no store.
        teacher = load_teacher(cfg)
        if args.device.startswith("cuda"):
            to_bf16(teacher)
        dev, dt = teacher.device, getattr(teacher, "dtype", torch.float32)
        grid = fixed_sigmas(cfg.schedule.teacher_steps, cfg.schedule.shift)

        def velocity(x, sigma, cond):                         # as GenerateWorker.velocity: fp32 ODE state
            return teacher.velocity(x.to(dt), sigma, cond).float()
        plan, prompts = plan_samples(cfg), generate_prompts(cfg)
        batches = []
        for b in range(0, S, args.batch):
            sl = slice(b, min(b + args.batch, S))
            batches.append((noise_for(plan["seed"][sl], teacher.sample_shape).to(dev),
                            {k: v.to(dev, dt) for k, v in teacher.encode(
                                [prompts[p] for p in plan["prompt_index"][sl]]).items()},
                            {k: v.to(dev, dt) for k, v in teacher.encode([""] * (sl.stop - sl.start)).items()},
                            torch.from_numpy(plan["guidance"][sl]).to(dev)))

        def bare_loop(grid=grid) -> tuple[float, torch.Tensor]:
            with torch_threads(args.threads):
                t0 = time.perf_counter()
                for noise, cond, null, w in batches:
                    out = sample(velocity, noise, grid, cond, null, w)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0, out

        bare_loop(grid[:3])                             # warm-up: kernels, allocator
        clocks = []
        if args.executor == "local":              # instrument the worker the local executor builds in-process
            make = job.make_worker

            def instrumented():
                w = make()
                if args.device.startswith("cuda"):
                    to_bf16(w.teacher)
                    w.dtype = torch.bfloat16
                clocks.append(ForwardClock(w.teacher, args.device))
                return w
            job.make_worker = instrumented
        prep = job.prepare
        prepare_s = []

        def timed_prepare():
            t = time.perf_counter()
            prep()
            prepare_s.append(time.perf_counter() - t)
        job.prepare = timed_prepare
        print(f"teacher: {name}; {S} samples, {cfg.schedule.teacher_steps} steps, batch {args.batch}, "
              f"device {args.device}, {args.threads} thread(s), executor {args.executor}")

        # Bare loop, pipeline (runner + store + records), bare loop again: the machine's drift shows in both.
        bare_before, _ = bare_loop()
        t0 = time.perf_counter()
        run_job(job, args.executor, progress=False)
        pipeline_s = time.perf_counter() - t0
        forward_s = sum(c.seconds for c in clocks)
        bare_after, out = bare_loop()
        bare_s = (bare_before + bare_after) / 2
        store = TrajectoryStore.open(generated_store_path(cfg))
        assert torch.allclose(out.float().cpu(), torch.from_numpy(store.states[S - len(out):, -1]), atol=1e-2)

        # 3) one cached segment read vs regenerating it with the teacher. Read: a fresh reader without the
        # shard cache (one chunk read from disk per segment, the worst case), and the default cached reader.
        reader = TrajectoryStore.open(generated_store_path(cfg), cache_bytes=0)
        rng = np.random.default_rng(0)
        K, per = reader.num_windows, cfg.schedule.teacher_steps // reader.num_windows
        picks = [(int(rng.integers(S)), int(rng.integers(K))) for _ in range(64)]
        t0 = time.perf_counter()
        for i, k in picks:
            reader.segment(i, k)
        read_s = (time.perf_counter() - t0) / len(picks)
        cached = TrajectoryStore.open(generated_store_path(cfg))
        cached.segments([i for i, _ in picks], [k for _, k in picks])         # warm the shard cache
        t0 = time.perf_counter()
        for i, k in picks:
            cached.segment(i, k)
        cached_s = (time.perf_counter() - t0) / len(picks)
        regen = []
        with torch_threads(args.threads):
            for i, k in picks[:8]:                      # window k needs the teacher from noise to edge k+1
                t0 = time.perf_counter()
                sample(velocity, noise_for([int(reader.seed[i])], reader.sample_shape).to(dev),
                       grid[:(k + 1) * per + 1], {c: v.to(dev, dt) for c, v in reader.cond(
                           reader.prompt_index[i:i + 1]).items()},
                       {c: v.to(dev, dt) for c, v in reader.null_cond(1).items()},
                       torch.from_numpy(reader.guidance[i:i + 1]).to(dev))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                regen.append(time.perf_counter() - t0)
        regen_s = float(np.mean(regen))

    print(f"pipeline: {pipeline_s:.2f}s = {S / pipeline_s:.1f} samples/s, all included (store creation + prompt "
          f"encoding {prepare_s[0]:.2f}s, teacher load, records)")
    if clocks:
        print(f"  inside teacher forward: {forward_s:.2f}s = {forward_s / pipeline_s:.3f} of wall time "
              f"(target >= 0.90)")
    else:
        print("  inside teacher forward: not measured under --executor ray (forwards run in actors)")
    print(f"bare loop: {bare_s:.2f}s = {S / bare_s:.1f} samples/s (mean of {bare_before:.2f}s before and "
          f"{bare_after:.2f}s after the pipeline)")
    print(f"  pipeline / bare throughput = {bare_s / pipeline_s:.3f} (target >= 0.90)")
    print(f"segment: read from disk {read_s * 1e3:.3f} ms (shard-cached {cached_s * 1e3:.3f} ms), regenerate "
          f"{regen_s * 1e3:.1f} ms -> {regen_s / read_s:.0f}x cheaper from disk, {regen_s / cached_s:.0f}x cached "
          f"(target >= 50x)")


if __name__ == "__main__":
    main()
