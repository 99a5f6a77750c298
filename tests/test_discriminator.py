"""The discriminator learns: trained alone on cached real window ends vs perturbed ones, it separates them."""
from __future__ import annotations

import pytest
import torch

from conftest import generated_toy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory):
    return generated_toy(tmp_path_factory, "disc", {"generate": {"samples_per_prompt": 16, "shard_size": 16},
                                                    "train": {"adversarial": {"disc_blocks": 1}}}, "c.yaml")[2]


def train_alone(cfg, steps: int, noise: float, **disc_kwargs) -> tuple[float, float, float]:
    """(d_loss, acc_real, acc_fake) over the last 30 of `steps` D steps; fake = real window end + noise."""
    from pipeline.data import RowSource
    from pipeline.methods.discriminator import TransformerDiscriminator, accuracy, hinge_d_loss
    from pipeline.teachers import load_teacher
    from stages.train import open_store

    torch.manual_seed(0)
    teacher = load_teacher(cfg)
    rows = RowSource(cfg, open_store(cfg), teacher.sample_shape, seed=0)
    disc = TransformerDiscriminator(teacher.transformer, 1, **disc_kwargs)
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=cfg.train.adversarial.disc_lr,
                            weight_decay=cfg.train.weight_decay)
    history = []
    for step in range(steps):
        b = rows.at(step).segments(8)
        real = b["z_end"]
        fake = real + noise * torch.randn_like(real)
        both = {k: torch.cat([v, v]) for k, v in b["cond"].items()}
        logits = disc(torch.cat([real, fake]), torch.cat([b["sigma_end"]] * 2), both)
        loss = hinge_d_loss(logits[:8], logits[8:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append([float(loss), *(float(a) for a in accuracy(logits[:8].detach(), logits[8:].detach()))])
    return tuple(torch.tensor(history[-30:]).mean(0).tolist())


def test_default_discriminator_separates_real_from_perturbed_window_ends(store_cfg):
    d_loss, acc_real, acc_fake = train_alone(store_cfg, 300, noise=1.0)
    assert (acc_real + acc_fake) / 2 > 0.75, (acc_real, acc_fake)
    assert d_loss < 1.7                        # hinge 2.0 = the same output for real and fake
