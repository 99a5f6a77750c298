"""Per-sample random draws that depend on the sample's seed alone (docs/store.md, "Who builds what"): its
initial noise, the seeds of a generate plan, and its CFG scale. Any worker, executor or resume draws the
same values for the same sample, which is what makes stores bit-identical across them."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def noise_for(seed: int | Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The initial noise of a sample (float32, CPU) from its seed alone; a list of seeds gives [n, *shape]."""
    if not isinstance(seed, (int, np.integer)):
        return torch.stack([noise_for(int(s), shape) for s in seed]) if len(seed) else torch.empty(0, *shape)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed)))


def sample_seeds(base_seed: int, n: int) -> np.ndarray:
    """Per-sample seeds hashed from (generate.seed, index): large, so they never meet small evaluation seeds."""
    return np.fromiter((np.random.SeedSequence([base_seed, i]).generate_state(1, np.uint32)[0] for i in range(n)),
                       dtype=np.int64, count=n)


def guidance_for(seeds: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """w ~ U[lo, hi] per sample, drawn from the sample's seed (a stream apart from its noise)."""
    return np.fromiter((lo + (hi - lo) * np.random.default_rng([int(s), 1]).random() for s in seeds),
                       dtype=np.float64, count=len(seeds)).astype(np.float32)
