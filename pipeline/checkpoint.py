"""Training checkpoints: everything needed to continue bit-exactly, in ONE file, committed atomically.

Layout in a train dir: `checkpoints/step-000100.pt` (temp file, fsync, rename) and then `latest.json`
({"step", "file"}) rewritten the same way; a crash between the two leaves the previous pointer intact, so
every start resumes from the latest *committed* checkpoint. Older files beyond `keep` are removed after
the pointer moves.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write_json, atomic_write_stream

POINTER = "latest.json"


def rng_state() -> dict[str, Any]:
    """Every global RNG a step may touch (python, numpy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def load_checkpoint(directory: Path, map_location="cpu") -> dict[str, Any] | None:
    """The latest committed checkpoint's state, or None when training has not committed one yet."""
    try:
        pointer = json.loads((Path(directory) / POINTER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    with open(Path(directory) / pointer["file"], "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=False)
