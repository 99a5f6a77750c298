"""Student EMA warm-up: after N steps of a parameter jump 0 -> 1 the average sits where the closed form says."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.trainer import EMA, ema_beta


def jumped_average(warmup: str, steps: int, decay: float, images_per_step: int = 4, rampup: float = 0.05):
    """A one-parameter module that jumps from 0 to 1 and stays: its EMA after `steps` updates."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay, warmup, images_per_step, rampup)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for t in range(steps):
        ema.update(net, t)
    return float(ema.shadow["weight"]), ema.relative_distance(net)


@pytest.mark.parametrize("steps", [1, 10, 150])
def test_power_warmup_is_one_minus_the_product_of_its_decays(steps):
    # beta_t = (1+t)/(10+t) below the ceiling: prod_{t<N} beta_t = 9! N! / (N+9)!
    value, ratio = jumped_average("power", steps, decay=0.9999)
    expected = 1 - math.factorial(9) * math.factorial(steps) / math.factorial(steps + 9)
    assert value == pytest.approx(expected, rel=1e-5)
    assert ratio == pytest.approx(expected, rel=1e-5)       # the raw weight moved by 1, the average by `value`


def test_power_warmup_stops_at_the_decay():
    assert ema_beta(10_000, 0.99, "power") == 0.99 and ema_beta(0, 0.99, "power") == pytest.approx(0.1)


@pytest.mark.parametrize("steps", [1, 20, 150])
def test_edm_rampup_half_life_grows_with_images_seen(steps):
    # rampup 1: half-life after t+1 steps = (t+1) B images (below the cap) -> beta_t = 0.5 ** (1/(t+1)),
    # so the remaining share of the initial value is 0.5 ** H_N (H_N the N-th harmonic number)
    value, _ = jumped_average("edm", steps, decay=0.99999, images_per_step=4, rampup=1.0)
    harmonic = sum(1 / k for k in range(1, steps + 1))
    assert value == pytest.approx(1 - 0.5 ** harmonic, rel=1e-5)


def test_edm_caps_at_the_decays_half_life_and_none_is_constant():
    # after the ramp the decay is the configured one: 32 images per step at 0.99 -> beta = 0.99
    assert ema_beta(100_000, 0.99, "edm", images_per_step=32) == pytest.approx(0.99)
    value, _ = jumped_average("none", 150, decay=0.99)
    assert value == pytest.approx(1 - 0.99 ** 150, rel=1e-5)       # 22% still at the init: the old behaviour


def test_warmed_up_average_leaves_the_init_like_the_raw_weights():
    """A parameter moving linearly (as a trained weight drifts): after 150 steps the warmed-up average is
    >= 0.9 of the raw distance from the init; the unwarmed 0.99 average only ~0.6 (the issue's demo)."""
    def ratio(warmup):
        net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(net.weight)
        ema = EMA(net, 0.99, warmup, 32, 0.05)
        for t in range(150):
            with torch.no_grad():
                net.weight.add_(1.0)
            ema.update(net, t)
        return ema.relative_distance(net)
    assert ratio("edm") >= 0.9 and ratio("power") >= 0.88
    assert ratio("none") < 0.6


def test_unknown_warmup_is_refused():
    with pytest.raises(ValueError, match="warm-up"):
        EMA(torch.nn.Linear(1, 1), 0.99, "cosine")
