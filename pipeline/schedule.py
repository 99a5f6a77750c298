"""Sigma schedules: the fixed FlowMatchEuler grid (ends at 0) and the diffusers-default one it replaces.

Convention: x_sigma = (1 - sigma) x0 + sigma eps, sigma=1 noise, timestep = 1000 * sigma.
"""
from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u, shift: float):
    """Static shift (SD3 eq. 23): s = a u / (1 + (a - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(s, shift: float):
    """Inverse of the static shift (SD3 eq. 23): u = s / (a - (a - 1) s)."""
    return s / (shift - (shift - 1) * s)


def dynamic_shift_sigma(u, mu: float, power: float = 1.0):
    """Resolution-dependent shift (diffusers time_shift 'exponential'): e^mu / (e^mu + (1/u - 1)^power)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    out = math.exp(mu) / (math.exp(mu) + (1 / u.clamp_min(1e-12) - 1) ** power)
    return torch.where(u > 0, out, torch.zeros_like(out))


def fixed_sigmas(n: int, shift: float = 3.0, mu: float | None = None) -> torch.Tensor:
    """FlowSteer's fix: sigma_i = shift(1 - i/n), i = 0..n, ending exactly at 0 (n + 1 values)."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    u = 1 - torch.arange(n + 1, dtype=torch.float64) / n
    s = dynamic_shift_sigma(u, mu) if mu is not None else shift_sigma(u, shift)
    s[-1] = 0.0
    return s.float()


def default_sigmas(n: int, shift: float = 3.0, mu: float | None = None) -> torch.Tensor:
    """What diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(n) gives: a linspace from 1 to the
    (already shifted) training sigma_min, shifted again, then a trailing 0 (the double shift of #13243)."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    train = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float64).flip(0)
    train = train / NUM_TRAIN_TIMESTEPS
    if mu is None:
        train = shift_sigma(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    u = torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)
    s = dynamic_shift_sigma(u, mu) if mu is not None else shift_sigma(u, shift)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


SCHEDULES = ("fixed", "diffusers")      # the names of the two grids everywhere (evaluate.schedules, --schedule)


def make_sigmas(n: int, shift: float = 3.0, kind: str = "fixed", mu: float | None = None) -> torch.Tensor:
    """The grid named `kind`: "fixed" (ends at 0) or "diffusers" (diffusers' default set_timesteps grid)."""
    if kind == "fixed":
        return fixed_sigmas(n, shift, mu)
    if kind == "diffusers":
        return default_sigmas(n, shift, mu)
    if kind == "default":
        raise ValueError("schedule 'default' is spelled 'diffusers' (the name evaluate.schedules uses)")
    raise ValueError(f"unknown schedule '{kind}' (use {' or '.join(SCHEDULES)})")


def piecewise_sigmas(n: int, num_windows: int, shift: float) -> torch.Tensor:
    """A student's n-step grid over K = num_windows windows: every window edge it crosses is a step point.

    n >= K: window k gets n//K steps (+1 for the first n%K windows), evenly spaced in unshifted time;
    n < K: n must divide K and each step spans K/n windows. With K | n this equals fixed_sigmas(n)."""
    if n < 1 or num_windows < 1:
        raise ValueError(f"steps ({n}) and windows ({num_windows}) must both be >= 1")
    if n >= num_windows:
        per = [n // num_windows + (k < n % num_windows) for k in range(num_windows)]
        u = [torch.tensor([1.0], dtype=torch.float64)]
        for k, m in enumerate(per):
            a, b = 1 - k / num_windows, 1 - (k + 1) / num_windows
            u.append(a + (b - a) * torch.arange(1, m + 1, dtype=torch.float64) / m)
        s = shift_sigma(torch.cat(u), shift)
    else:
        if num_windows % n:
            raise ValueError(f"{n} steps cannot keep {num_windows} window edges: "
                             f"use a divisor or multiple of {num_windows}")
        s = fixed_sigmas(n, shift).double()
    s[-1] = 0.0
    return s.float()
