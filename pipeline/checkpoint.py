"""Training checkpoints: everything needed to continue bit-exactly, in ONE file, committed atomically.

Layout in a train dir: `checkpoints/step-000100.pt` (temp file, fsync, rename) and then `latest.json`
({"step", "file"}) rewritten the same way; a crash between the two leaves the previous pointer intact, so
every start resumes from the latest *committed* checkpoint. Older files beyond `keep` are removed after
the pointer moves.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write_json, atomic_write_stream

POINTER = "latest.json"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, e.g. (seed, "batch", rank, step): independent streams, reproducible on
    resume and in any process (the batch loader's workers seed each step's batch_rng with it)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rng_state() -> dict[str, Any]:
    """Every global RNG a step may touch (python, numpy, torch CPU and CUDA), as tensors and plain types
    only, so checkpoints load with `torch.load(weights_only=True)`."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
            "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                      float(np_gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), gauss))
    kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as checkpoints/step-XXXXXX.pt, fsync it, then move the pointer to it."""
    directory = Path(directory)
    ckpt_dir = directory / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:06d}.pt"
    # streamed, not via bytes: checkpoints of real students are large
    atomic_write_stream(path, lambda f: torch.save({"step": step, **state}, f))
    atomic_write_json(directory / POINTER, {"step": step, "file": str(path.relative_to(directory))})
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_step(directory: Path) -> int:
    """The step of the latest committed checkpoint, 0 when there is none."""
    try:
        return int(json.loads((Path(directory) / POINTER).read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _read(path: Path, map_location="cpu", mmap: bool = False) -> dict[str, Any]:
    """One checkpoint file. weights_only=True: a file placed here by someone else (a pickle) never runs code."""
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("not a flowsteer checkpoint")
    return state


def candidates(directory: Path) -> list[Path]:
    """Checkpoint files to try, newest first: the pointer's file, then the older kept ones."""
    directory = Path(directory)
    try:
        first = directory / json.loads((directory / POINTER).read_text())["file"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return []                        # no committed checkpoint yet
    older = sorted((p for p in (directory / "checkpoints").glob("step-*.pt") if p.name < first.name), reverse=True)
    return [first, *older]


def check_file(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (None when it loads). Cheap: tensors are mmapped."""
    try:
        _read(path, mmap=True)
    except Exception as exc:  # any unreadable file (truncated, foreign, pickle refused)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return None


def settle(directory: Path, warn=print) -> int:
    """The step of the newest checkpoint that loads; when the pointer's file does not, warn and move the
    pointer back to the previous kept one (never deleting anything). 0 when none exists.

    Raises UserError when checkpoints exist but none loads, so a run never silently restarts from scratch."""
    from pipeline.errors import UserError

    files = candidates(directory)
    problems = []
    for path in files:
        problem = check_file(path) if path.exists() else "missing"
        if problem is None:
            step = int(_read(path, mmap=True)["step"])
            if path != files[0]:
                warn(f"warning: checkpoint {files[0]} cannot be loaded ({problems[0]}); resuming from {path}")
                atomic_write_json(Path(directory) / POINTER,
                                  {"step": step, "file": str(path.relative_to(directory))})
            return step
        problems.append(problem)
    if files:
        raise UserError(f"no checkpoint in {Path(directory) / 'checkpoints'} can be loaded (newest {files[0].name}: "
                        f"{problems[0]}); move the directory away to train from step 0")
    return 0


def load_checkpoint(directory: Path, map_location="cpu") -> dict[str, Any] | None:
    """The newest loadable committed checkpoint's state (the pointer's file, else an older kept one, with a
    warning line), or None when training has not committed one yet."""
    import sys

    files = candidates(directory)
    for path in files:
        try:
            state = _read(path, map_location)
        except Exception as exc:  # noqa: BLE001  (truncated, foreign or refused: try the previous one)
            print(f"warning: checkpoint {path} cannot be loaded ({type(exc).__name__}); trying an older one",
                  file=sys.stderr)
            continue
        return state
    if files:
        from pipeline.errors import UserError

        raise UserError(f"no checkpoint in {Path(directory) / 'checkpoints'} can be loaded; move the directory "
                        f"away to train from step 0")
    return None
