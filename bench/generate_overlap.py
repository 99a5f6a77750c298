"""Generation at SD3-Medium shapes: a shard's conditions written while its states are solved vs after them.

    python bench/generate_overlap.py [--samples 128] [--shard 64] [--batch 16] [--rounds 2]

The teacher: bench/train_scale.py's byo teacher (SD3-Medium *shapes*, tiny compute: 16x64x64 latents, 333 x 4096
text conditions + 2048 pooled, bf16), float16 store, 8 teacher steps, 4 windows. Each round runs `flowsteer
generate` into two fresh stores, one per variant (`GenerateWorker.overlap_writes` True / False), in alternating
order so machine load hits both alike. Prints per variant the median shard seconds (unit records) and the stage's
wall time, the conditions' write time (overlapped or not), and the ratio. Both stores must be the same bytes
(their shard checksums are compared). Numbers: docs/precision.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.train_scale import scale_config  # noqa: E402


def run_variant(base: Path, overlap: bool, samples: int, shard: int, batch: int) -> tuple[float, list[dict]]:
    from pipeline.cli import run_stage
    from stages.generate import GenerateWorker

    root = base / ("overlap" if overlap else "after")
    shutil.rmtree(root, ignore_errors=True)
    cfg = scale_config(root, prompts=samples, per_prompt=1)
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"shard_size": shard,
                                                                             "batch_size": batch})})
    GenerateWorker.overlap_writes = overlap
    t0 = time.perf_counter()
    run_stage("generate", cfg, "local")
    wall = time.perf_counter() - t0
    records = [json.loads(p.read_text()) for p in sorted((cfg.stage_dir("generate") / "_records").glob("*.json"))]
    shutil.rmtree(root, ignore_errors=True)
    return wall, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--shard", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="flowsteer-bench-overlap-"))
    walls: dict[bool, list[float]] = {True: [], False: []}
    units: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.rounds):
        for overlap in ((True, False) if r % 2 == 0 else (False, True)):
            wall, records = run_variant(base, overlap, args.samples, args.shard, args.batch)
            walls[overlap].append(wall)
            units[overlap] += records
    checks = {overlap: sorted(rec["checksum"] for rec in recs) for overlap, recs in units.items()}
    assert checks[True] == checks[False], "the two variants wrote different stores"
    print(f"generate at SD3-Medium shapes: {args.samples} samples, shards of {args.shard}, batch {args.batch}, "
          f"{args.rounds} rounds (stores identical: {len(set(checks[True]))} distinct shard checksums)")
    for overlap, name in ((False, "conditions written after the solves"), (True, "conditions written during them")):
        recs = units[overlap]
        shard_s = statistics.median(rec["seconds"] for rec in recs)
        write_s = statistics.median(rec["write_seconds"] for rec in recs)
        cond_s = statistics.median(rec.get("cond_write_seconds", 0.0) for rec in recs)
        print(f"  {name}: {shard_s:.2f} s/shard (median), stage wall {statistics.median(walls[overlap]):.1f} s, "
              f"write after the solves {write_s:.2f} s/shard, conditions' write {cond_s:.2f} s/shard")
    ratio = statistics.median(r["seconds"] for r in units[False]) / statistics.median(r["seconds"] for r in units[True])
    print(f"  shard time, after / during: {ratio:.2f}x")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
