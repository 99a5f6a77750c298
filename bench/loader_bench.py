"""The batch loader at SD3-Medium shapes on the CPU: where a batch's time goes, loader-only throughput with 0, 1
and 2 worker processes, and an emulated GPU step fed by the real loader.

    python bench/loader_bench.py [--samples 512] [--batch 16] [--steps 24] [--workers 0 1 2] [--sleep-ms 250 100]
                                 [--no-t5]     # conditions as SD3 without T5: the store keeps their non-zero chunks

The store: `flowsteer generate` with bench/train_scale.py's byo teacher (SD3-Medium *shapes*, tiny compute):
16x64x64 latents, K = 4 windows, 333 x 4096 text conditions + 2048 pooled, float16 on disk, 64 samples per
shard (the default), `--samples` trajectories (2 per prompt), in a stable temp dir (reruns reuse it). The rows
drawn are OTA's (train.online_fraction 0.25: cached segments + noise and prompts for the online rows).

Prints
  * the breakdown of one batch drawn in this process (median of --steps): segment reads, condition reads,
    random draws;
  * loader-only: batches drawn as fast as the loader hands them out (as drawn: conditions in float16; the
    float32 cast is the device's), samples/s and MB/s of rows delivered, with each worker count (after one
    untimed batch: the workers' start);
  * the emulated GPU step: a step that sleeps T ms (no CPU, as a GPU step would use none) after taking its rows
    from the loader; the data-wait share = time waiting for rows / step time, per T and worker count
    (target <= 2% with workers on).
Numbers: docs/precision.md. The machine's 2 cores may be shared with other jobs: say so with the numbers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from bench.train_scale import scale_config  # noqa: E402


def row_bytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(row_bytes(v) for v in tree.values())
    return tree.numel() * tree.element_size() if isinstance(tree, torch.Tensor) else 0


def make_trainer(cfg, workers: int, depth: int):
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from stages.train import open_store

    c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loader_workers": workers, "prefetch": depth})})
    return Trainer(c, "ota", load_teacher(cfg), open_store(cfg), "cpu")


def breakdown(trainer, steps: int) -> None:
    """Time the parts of OTA's draw for one batch, in this process."""
    from pipeline.data import StepRows

    parts: dict[str, list[float]] = {"segments": [], "conditions": [], "draws": []}
    src = trainer.rows
    n = src.batch_size
    online = int(round(n * trainer.cfg.train.online_fraction))
    for step in range(1000, 1000 + steps):
        rows = StepRows(src, step)
        t0 = time.perf_counter()
        k = rows.windows(n)
        idx = rows.randint(src.store.num_samples, n - online)
        p = rows.prompts(online)
        rows.noise(online)
        rows.guidance(online)
        t1 = time.perf_counter()
        src.store.segments(idx.numpy(), k[:n - online].numpy())
        t2 = time.perf_counter()
        src.cond(torch.cat([src.store_prompt[idx], p]))
        t3 = time.perf_counter()
        parts["draws"].append(t1 - t0)
        parts["segments"].append(t2 - t1)
        parts["conditions"].append(t3 - t2)
    total = sum(statistics.median(v) for v in parts.values())
    print(f"one batch of {n} drawn in this process: {1000 * total:.0f} ms (median parts: " + ", ".join(
        f"{name} {1000 * statistics.median(v):.0f} ms ({100 * statistics.median(v) / total:.0f}%)"
        for name, v in parts.items()) + ")")


def loader_only(cfg, workers: int, steps: int) -> tuple[float, float]:
    """(samples/s, MB/s) of rows handed out by the loader, nothing else running."""
    trainer = make_trainer(cfg, workers, 2)
    loader = trainer.loader
    nbytes = row_bytes(loader.rows(0))                       # untimed: starts the workers
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        loader.rows(s)
    dt = time.perf_counter() - t0
    trainer.close()
    return steps * trainer.rows.batch_size / dt, steps * nbytes / dt / 1e6


def emulated(cfg, workers: int, steps: int, sleep_ms: float) -> tuple[float, float]:
    """(data-wait share, step seconds) of steps that take their rows and sleep `sleep_ms`: the GPU's work, its
    copy of the rows (pinned, on a side stream) and their cast to float32 included."""
    trainer = make_trainer(cfg, workers, 2)
    loader = trainer.loader
    loader.rows(0)
    time.sleep(sleep_ms / 1000)
    w0, t0 = loader.wait_seconds, time.perf_counter()
    for s in range(1, steps + 1):
        loader.rows(s)
        time.sleep(sleep_ms / 1000)
    total = time.perf_counter() - t0
    wait = loader.wait_seconds - w0
    trainer.close()
    return wait / total, total / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sleep-ms", type=float, nargs="+", default=[250.0, 100.0])
    ap.add_argument("--compressor", default="none", choices=["none", "zstd", "blosc"])
    ap.add_argument("--no-t5", action="store_true",
                    help="conditions as SD3 without T5 (zero past 77 tokens x 2048 features): the store keeps "
                         "only their non-zero chunks")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from pipeline.cli import run_stage

    root = Path(tempfile.gettempdir()) / (f"flowsteer-bench-loader-{args.samples}-{args.compressor}"
                                          + ("-not5" if args.no_t5 else ""))
    cfg = scale_config(root, prompts=args.samples // 2, per_prompt=2, no_t5=args.no_t5)
    cfg = cfg.model_copy(update={
        "generate": cfg.generate.model_copy(update={"shard_size": 64, "batch_size": 16,
                                                    "compressor": args.compressor}),
        "train": cfg.train.model_copy(update={"batch_size": args.batch})})
    t0 = time.perf_counter()
    run_stage("generate", cfg, "local")
    store_dir = cfg.stage_dir("generate")
    disk = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
    print(f"store: {args.samples} trajectories x 5 edges x 16x64x64, conditions 333x4096 + 2048"
          f"{' (no T5: non-zero 77x2048)' if args.no_t5 else ''}, float16, "
          f"compressor {args.compressor}, {disk / 1e9:.2f} GB on disk ({time.perf_counter() - t0:.0f} s to make or "
          f"find); batch {args.batch}, OTA rows (online_fraction 0.25)")

    trainer = make_trainer(cfg, 0, 0)
    rows = trainer.loader.rows(0)
    print(f"rows of one batch: {row_bytes(rows) / 1e6:.1f} MB as handed to the step, conditions in float16 "
          f"({', '.join(sorted(rows))})")
    breakdown(trainer, args.steps)
    trainer.close()

    for workers in args.workers:
        sps, mbs = loader_only(cfg, workers, args.steps)
        print(f"loader only, {workers} worker(s): {sps:.1f} samples/s, {mbs:.0f} MB/s of rows")
    for sleep_ms in args.sleep_ms:
        for workers in args.workers:
            share, step_s = emulated(cfg, workers, args.steps, sleep_ms)
            print(f"emulated GPU step {sleep_ms:.0f} ms, batch {args.batch}, {workers} worker(s): data wait "
                  f"{100 * share:.1f}% of the step ({step_s * 1000:.0f} ms/step; target <= 2% with workers on)")


if __name__ == "__main__":
    main()
