"""The evaluate stage's saved teacher samples, the target of trajectory fidelity (and of FID against the
teacher): `<evaluate dir>/teacher/outputs/seed<s>.npz` per evaluation seed, with the noise that made them.
Their one home: the evaluate stage writes them, the metrics (through EvalContext) read them."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes


def outputs_path(evaluate_dir, seed: int) -> Path:
    """Where the teacher's final samples of evaluation seed `seed` live."""
    return Path(evaluate_dir) / "teacher" / "outputs" / f"seed{seed}.npz"


def save_outputs(path: Path, x: torch.Tensor, prompt_index: torch.Tensor, noise_seeds: np.ndarray) -> None:
    """The teacher's final samples for one evaluation seed (with what made them), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, x=x.float().cpu().numpy(), prompt_index=prompt_index.cpu().numpy(), noise_seeds=noise_seeds)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_outputs(path: Path, noise_seeds: np.ndarray | None = None) -> torch.Tensor:
    """The saved teacher samples; checks they were made from the same noise as the student's."""
    try:
        with np.load(Path(path)) as f:
            x, seeds = f["x"], f["noise_seeds"]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"teacher outputs {path} are missing or unreadable ({type(exc).__name__}): "
                        f"rerun `flowsteer evaluate`") from None
    if noise_seeds is not None and not np.array_equal(seeds[:len(noise_seeds)], noise_seeds):
        raise UserError(f"teacher outputs {path} were made from other noise than this evaluation's")
    return torch.from_numpy(x[:len(noise_seeds)] if noise_seeds is not None else x)
