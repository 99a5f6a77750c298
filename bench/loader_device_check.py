"""The batch loader's device path, checked: worker processes hand SD3-sized batches through the shared arena,
page-locked for the device, copied on a side stream; every batch must equal the one drawn in this process.

    python bench/loader_device_check.py [--device cuda] [--workers 2] [--steps 24] [--step-ms 100]

Each step takes its rows with `BatchLoader.next` and then "works" for --step-ms: on CUDA a loop of matmuls
queued on the step's stream (timed by the device), elsewhere a sleep. Prints whether the arena is page-locked,
whether all batches matched, and the data-wait share of the step (target <= 2%). Part of bench/gpu_check.sh;
on a CPU it checks the same path without page-locking.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TOKENS, WIDTH, BATCH = 333, 4096, 16


def draw(step: int) -> dict:
    """Rows as the loader reads them (into `shard_reader.empty`: the arena in a worker), a pure function of step."""
    from pipeline.shard_reader import empty

    g = torch.Generator().manual_seed(step)
    cond = empty((BATCH, TOKENS, WIDTH), torch.float16)
    cond.copy_(torch.randn(BATCH, 1, WIDTH, generator=g).expand(BATCH, TOKENS, WIDTH))
    z = empty((BATCH, 16, 64, 64))
    z.copy_(torch.randn(BATCH, 16, 64, 64, generator=g))
    return {"cond": cond, "z": z, "k": torch.randint(4, (BATCH,), generator=g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--step-ms", type=float, default=100.0)
    args = ap.parse_args()
    from pipeline.loader import BatchLoader, to_device

    device = torch.device(args.device)
    loader = BatchLoader(draw, device, workers=args.workers, depth=2, last_step=args.steps + 1)
    work = torch.randn(2048, 2048, device=device) if device.type == "cuda" else None
    matmuls = 1
    if work is not None:                              # how many matmuls make --step-ms on this device
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            work @ work
        torch.cuda.synchronize()
        matmuls = max(1, round(args.step_ms / 1000 / ((time.perf_counter() - t0) / 20)))
    loader.next(0)                                    # starts the workers (not timed)
    pinned = loader._arena is not None and loader._arena.pinned
    w0, t0 = loader.wait_seconds, time.perf_counter()
    for step in range(1, args.steps + 1):             # timed: take the rows, then the step's work
        loader.next(step)
        if work is not None:
            for _ in range(matmuls):
                work @ work
        else:
            time.sleep(args.step_ms / 1000)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    wait = loader.wait_seconds - w0
    same = True                                       # then, untimed: the same steps again, each checked
    for step in range(1, args.steps + 1):
        rows = loader.next(step)                      # (step 1 restarts the workers there)
        expected = to_device(draw(step), device)
        same &= all(torch.equal(rows[k], expected[k]) for k in expected)
    loader.close()
    print(f"loader on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.workers} workers, {BATCH} x ({TOKENS}x{WIDTH} fp16 + 16x64x64) a batch: arena page-locked "
          f"{pinned}; {args.steps} batches identical to in-process draws: {same}; data wait "
          f"{100 * wait / total:.1f}% of a {1000 * total / args.steps:.0f} ms step (target <= 2%)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
