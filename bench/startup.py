"""CLI start-up time: `flowsteer --help` and `flowsteer status` of one code version against another, side by side.

    python bench/startup.py                       # this checkout against `git archive main` (the baseline)
    python bench/startup.py --before REF --repeat 9

Each command runs `--repeat` times per version, the versions interleaved (so a busy machine slows both alike),
in a fresh process (`python -m pipeline.cli ...`) from an empty working directory with the embedded default
config; it prints the min and median wall seconds and the heavy libraries each command imported
(`python -X importtime`). docs/reliability.md quotes its output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "ray", "scipy", "pandas")
COMMANDS = {"--help": ["--help"], "status": ["status"]}


def checkout(ref: str, dest: Path) -> Path:
    """`ref`'s tree as plain files under dest (git archive: no worktree bookkeeping left behind)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_once(code: Path, args: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def heavy_imports(code: Path, args: list[str], cwd: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True)
    names = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    return [h for h in HEAVY if h in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="main", help="git ref of the baseline (default: main)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = {f"before ({args.before})": checkout(args.before, tmp / "before"), "after (this tree)": REPO}
        cwd = tmp / "cwd"
        cwd.mkdir()
        times: dict[tuple[str, str], list[float]] = {}
        for name, cmd in COMMANDS.items():
            for code in versions.values():                     # warm the file cache and .pyc files
                run_once(code, cmd, cwd)
            for _ in range(args.repeat):
                for label, code in versions.items():
                    times.setdefault((name, label), []).append(run_once(code, cmd, cwd))
        print(f"{'command':10s} {'version':24s} {'min s':>7s} {'median s':>9s}  heavy imports")
        for (name, label), ts in times.items():
            heavy = ", ".join(heavy_imports(versions[label], COMMANDS[name], cwd)) or "none"
            print(f"{name:10s} {label:24s} {min(ts):7.2f} {statistics.median(ts):9.2f}  {heavy}")
        shutil.rmtree(cwd, ignore_errors=True)
    print(f"({args.repeat} runs each, interleaved; {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
