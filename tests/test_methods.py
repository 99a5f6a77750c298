"""PeRFlow / OTA / FlowSteer: chord targets, window ends, discriminator, hinge losses, gradient routing."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.methods import get_method
from pipeline.methods.base import MethodContext
from pipeline.methods.discriminator import (TransformerDiscriminator, feature_matching_loss, hinge_d_loss,
                                            hinge_g_loss)
from pipeline.methods.flowsteer import resample_windows
from pipeline.methods.common import chord_point, chord_times, chord_velocity
from pipeline.schedule import fixed_sigmas, shift_sigma, unshift_sigma
from pipeline.teachers.toy import make_toy_teacher
from pipeline.trainer import frozen
from schemas.config import RunConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_cfg(**train) -> RunConfig:
    return RunConfig.model_validate({
        "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher"},
        "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
        "train": {"batch_size": 4, **train}})


class LinearField(torch.nn.Module):
    """A 'student' with the SD3 call signature and a known velocity v = a x (one trainable scalar a)."""

    def __init__(self, a: float = 1.0):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        return (self.a * hidden_states,)


class FixedRows:
    """A RowSource stand-in: every step's rows are the same segments / real rows (the calls remembered), drawn
    with a generator seeded `seed` afresh at each step, as StepRows' batch_rng is."""

    def __init__(self, segments=None, real=None, seed=0):
        self._segments, self._real, self.seed, self.calls = segments, real, seed, []

    def at(self, step):
        self.rng = torch.Generator().manual_seed(self.seed)
        return self

    def segments(self, n, window_probs=None, online_fraction=0.0):
        self.calls.append(dict(n=n, window_probs=window_probs, online_fraction=online_fraction))
        return {k: (dict(v) if isinstance(v, dict) else v.clone()) for k, v in self._segments.items()}

    def real(self, n):
        rows = {k: (dict(v) if isinstance(v, dict) else v[:n].clone()) for k, v in self._real.items()}
        return {**rows, "index": torch.arange(n)}

    def noise(self, n):
        return torch.randn(n, 1, 8, 8, generator=self.rng)


FixedSegments = FixedRows


def make_method(name, cfg, rows, teacher=None, options=None, seed=0):
    from pipeline.data import Windows
    from pipeline.teacher_solves import TeacherSolves

    solves = TeacherSolves(teacher, None, "cpu", Windows.of(cfg)) if teacher is not None else None
    ctx = MethodContext(cfg=cfg, teacher=teacher, rows=rows, solves=solves,
                        edges=fixed_sigmas(cfg.schedule.windows, cfg.schedule.shift), device=torch.device("cpu"),
                        step_rng=torch.Generator().manual_seed(seed), options=options or {})
    return get_method(name)(ctx)


def scalar_segments(k, z_start, z_end, online):
    """Segments of 1x1x1 'images' in windows k of the default toy grid, with a toy-shaped prompt condition."""
    w = fixed_sigmas(4, 3.0)
    k = torch.tensor(k)
    n = len(k)
    return {"z_start": torch.tensor(z_start).reshape(n, 1, 1, 1), "z_end": torch.tensor(z_end).reshape(n, 1, 1, 1),
            "sigma_start": w[k], "sigma_end": w[k + 1], "k": k,
            "cond": {"encoder_hidden_states": torch.randn(n, 4, 16), "pooled_projections": torch.randn(n, 16)},
            "guidance": torch.full((n,), 4.0), "online_mask": torch.tensor(online)}


# ---------------------------------------------------------------- the chord objective (shared)
def test_chord_target_and_point_hand_values():
    z_s, z_e = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    v_star = chord_velocity(z_s, z_e, torch.tensor([1.0]), torch.tensor([0.75]))
    assert v_star.item() == pytest.approx(2.0)                      # (0.5 - 1) / (0.75 - 1)
    assert chord_point(z_s, v_star, torch.tensor([1.0]), torch.tensor([0.9])).item() == pytest.approx(0.8)
    # the chord reaches the teacher's window end at t = s_e
    assert chord_point(z_s, v_star, torch.tensor([1.0]), torch.tensor([0.75])).item() == pytest.approx(0.5)


def test_chord_times_lie_in_window_and_are_uniform_in_unshifted_time():
    w = fixed_sigmas(4, 3.0)
    k = torch.arange(4).repeat(5000)
    t = chord_times(w[k], w[k + 1], 3.0, torch.Generator().manual_seed(0))
    assert ((t > w[k + 1]) & (t <= w[k] + 1e-6)).all()
    u = unshift_sigma(t.double(), 3.0)
    assert torch.allclose(shift_sigma(u, 3.0), t.double(), atol=1e-6)
    for j in range(4):                                              # window j is u in (1-(j+1)/4, 1-j/4]
        uj = u[k == j]
        assert uj.mean().item() == pytest.approx(1 - (j + 0.5) / 4, abs=0.01)
        assert uj.var().item() == pytest.approx((1 / 4) ** 2 / 12, rel=0.1)


def test_perflow_loss_equals_hand_value_on_a_linear_field():
    """v = x at the chord point z_t = z_s + (t - s_s) v*: loss = mean((z_t - v*)^2) with t from the same draw."""
    cfg = toy_cfg()
    method = make_method("perflow", cfg, rows=None)
    batch = scalar_segments([0, 3], [1.0, 0.2], [0.5, 0.1], [False, False])
    loss = method.generator_losses(LinearField(1.0), batch, step=0)["loss"]

    w = fixed_sigmas(4, 3.0).double()
    r = torch.rand(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = 0.0
    for row, (kk, zs, ze) in enumerate([(0, 1.0, 0.5), (3, 0.2, 0.1)]):
        ss, se = w[kk].item(), w[kk + 1].item()
        us, ue = ss / (3 - 2 * ss), se / (3 - 2 * se)               # unshift by hand
        u = us - r[row].item() * (us - ue)
        t = 3 * u / (1 + 2 * u)
        v_star = (ze - zs) / (se - ss)
        z_t = zs + (t - ss) * v_star
        expected += (z_t - v_star) ** 2 / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_perflow_window_start_interpolates_real_data_and_window_end_is_the_teacher_solve():
    cfg = toy_cfg()
    teacher = make_toy_teacher("cpu")
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = teacher.encode(["a", "b", "c", "d"])
    w_cfg = torch.tensor([1.0, 2.0, 3.0, 4.5])
    rows = FixedRows(real={"x0": x0, "cond": cond, "guidance": w_cfg}, seed=3)
    method = make_method("perflow", cfg, rows, teacher=teacher)
    batch = method.batch(step=0)

    check = torch.Generator().manual_seed(3)                       # replay the batch's two draws
    k = torch.randint(4, (4,), generator=check)
    eps = torch.randn(x0.shape, generator=check)
    assert torch.equal(batch["k"], k)
    s = fixed_sigmas(4, 3.0)[k].reshape(-1, 1, 1, 1)
    assert torch.allclose(batch["z_start"], (1 - s) * x0 + s * eps)

    grid, null = fixed_sigmas(8, 3.0), teacher.encode([""] * 4)
    for row in range(4):                                            # M/K = 2 CFG Euler sub-steps, by hand
        z = batch["z_start"][row:row + 1]
        c = {key: v[row:row + 1] for key, v in cond.items()}
        nc = {key: v[row:row + 1] for key, v in null.items()}
        for i in range(2 * int(k[row]), 2 * int(k[row]) + 2):
            sig = grid[i].reshape(1)
            v_c, v_u = teacher.velocity(z, sig, c), teacher.velocity(z, sig, nc)
            z = z + (grid[i + 1] - grid[i]) * (v_u + w_cfg[row] * (v_c - v_u))
        assert torch.allclose(batch["z_end"][row:row + 1], z, atol=1e-5)
    assert torch.allclose(batch["sigma_end"], fixed_sigmas(4, 3.0)[k + 1])


def test_perflow_on_the_diffusers_grid_takes_the_schedulers_edges_and_solves_them_with_the_teacher():
    """grid: diffusers -- windows on FlowMatchEulerDiscreteScheduler.set_timesteps(K) (double-shifted sigma_min),
    each window end the teacher's CFG solve over M/K sub-steps between those edges."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.schedule import default_sigmas, shift_sigma, unshift_sigma

    cfg = toy_cfg()
    teacher = make_toy_teacher("cpu")
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, w_cfg = teacher.encode(["a", "b", "c", "d"]), torch.tensor([1.0, 2.0, 3.0, 4.5])
    rows = FixedRows(real={"x0": x0, "cond": cond, "guidance": w_cfg}, seed=3)
    method = make_method("perflow", cfg, rows, teacher=teacher, options={"grid": "diffusers"})
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    assert torch.allclose(method.grid_edges, sched.sigmas.float())
    assert torch.allclose(method.grid_edges, default_sigmas(4, 3.0), atol=1e-6)
    assert method.grid_edges[-2] < 0.01 and method.export_meta()["grid"] == "diffusers"
    batch = method.batch(step=0)
    k = batch["k"]
    assert torch.allclose(batch["sigma_start"], method.grid_edges[k]) and torch.allclose(batch["sigma_end"],
                                                                                          method.grid_edges[k + 1])
    null = teacher.encode([""] * 4)
    for row in range(4):
        u0, u1 = (unshift_sigma(method.grid_edges[k[row] + d].double(), 3.0) for d in (0, 1))
        sub = shift_sigma(torch.stack([u0, (u0 + u1) / 2, u1]), 3.0).float()
        z = batch["z_start"][row:row + 1]
        c, nc = ({key: v[row:row + 1] for key, v in d.items()} for d in (cond, null))
        for i in range(2):
            v_c, v_u = teacher.velocity(z, sub[i].reshape(1), c), teacher.velocity(z, sub[i].reshape(1), nc)
            z = z + (sub[i + 1] - sub[i]) * (v_u + w_cfg[row] * (v_c - v_u))
        assert torch.allclose(batch["z_end"][row:row + 1], z, atol=1e-5)
    with pytest.raises(UserError, match="grid"):
        get_method("perflow").check_config(cfg, {"grid": "default", "x0": "teacher_samples"})


def test_real_data_is_sharded_across_ranks_and_one_rank_draws_the_global_batch():
    from pipeline.data import RowSource

    def source(rank, world, n):       # each rank has its own seed, as in the trainer; the permutation is shared
        cfg = toy_cfg(batch_size=n)
        return RowSource(cfg, None, (1, 8, 8), 100 + rank, rank, world, shared_seed=7)

    size, n = 10, 3                   # 3 rows per rank per step: a global batch of 6 on a 10-image epoch
    ranks, single = [source(0, 2, n), source(1, 2, n)], source(0, 1, 2 * n)
    for step in range(4):             # 24 draws: crosses two epoch boundaries
        drawn = [d.real_indices(step, size, n) for d in ranks]
        assert torch.equal(torch.cat(drawn), single.real_indices(step, size, 2 * n))
        assert all(d.real_position(step) == single.real_position(step) == 6 * step for d in ranks)
    epoch0 = sorted(torch.cat([source(r, 2, 5).real_indices(0, size, 5) for r in range(2)]).tolist())
    assert epoch0 == list(range(size))    # one global batch = one whole epoch: every image once, no overlap
    resumed = source(1, 2, n)             # a checkpoint's cursor: step 3 at position 18
    resumed.load_state_dict(ranks[1].state_dict(3), 3)
    assert torch.equal(resumed.real_indices(3, size, n), ranks[1].real_indices(3, size, n))
    with pytest.raises(ValueError, match="shared_seed"):      # ranks with their own seeds would overlap
        RowSource(toy_cfg(), None, (1, 8, 8), 1, 1, 2)

# ---------------------------------------------------------------- OTA
def test_ota_takes_authentic_segments_with_the_online_share_and_logs_it():
    cfg = toy_cfg(online_fraction=0.5)
    seg = scalar_segments([1, 2, 0, 3], [0.5, 0.3, 1.0, 0.1], [0.3, 0.1, 0.5, 0.0], [False, False, True, True])
    data = FixedSegments(seg)
    method = make_method("ota", cfg, data)
    batch = method.draw(0, data.at(0))          # the rows as drawn (the online rows' rollouts left out)
    assert data.calls == [dict(n=4, window_probs=None, online_fraction=0.5)]
    losses = method.generator_losses(LinearField(0.0), batch, step=0)   # v = 0: loss = mean(v*^2), t-free
    v_star = [(e - s) / (seg["sigma_end"][i] - seg["sigma_start"][i]).item()
              for i, (s, e) in enumerate(zip([0.5, 0.3, 1.0, 0.1], [0.3, 0.1, 0.5, 0.0]))]
    assert losses["loss"].item() == pytest.approx(sum(v ** 2 for v in v_star) / 4, rel=1e-5)
    assert losses["online_share"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- FlowSteer
def test_hinge_and_feature_matching_hand_values():
    assert hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])).item() == pytest.approx(0.25 + 0.5)
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)
    real = [torch.zeros(1, 2, 2), torch.ones(1, 1, 1)]
    fake = [torch.ones(1, 2, 2), torch.full((1, 1, 1), 3.0)]
    assert feature_matching_loss(real, fake).item() == pytest.approx(1.0 + 4.0)


@pytest.mark.parametrize("backbone", ["frozen", "trainable"])
def test_discriminator_uses_the_teachers_first_blocks_and_leaves_the_teacher_alone(backbone):
    """A frozen backbone IS the teacher's modules (one copy of the weights); a trainable one is a copy."""
    teacher = make_toy_teacher("cpu", layers=3)
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    disc = TransformerDiscriminator(teacher.transformer, blocks=2, backbone=backbone)
    bb = disc.shared or disc
    assert len(bb.blocks) == 2 and len(disc.heads) == 2
    shared = backbone == "frozen"
    for name in ("pos_embed", "time_text_embed", "context_embedder"):
        for (a, pa), (b, pb) in zip(getattr(bb, name).named_parameters(),
                                    getattr(teacher.transformer, name).named_parameters()):
            assert torch.equal(pa, pb) and (pa.data_ptr() == pb.data_ptr()) == shared
    for i in range(2):
        for pa, pb in zip(bb.blocks[i].parameters(), teacher.transformer.transformer_blocks[i].parameters()):
            assert torch.equal(pa, pb) and (pa.data_ptr() == pb.data_ptr()) == shared
    assert all(p.requires_grad for p in disc.heads.parameters())
    assert all(p.requires_grad == (backbone == "trainable") for p in bb.blocks.parameters())
    # the discriminator's own parameters (its optimiser's) are the heads, plus the copy when trainable
    assert (sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())) == shared

    x = torch.randn(3, 1, 8, 8)
    cond = teacher.encode(["a", "b", "c"])
    logits, feats = disc(x, torch.tensor([0.0, 0.5, 1.0]), cond, return_features=True)
    assert logits.shape == (3, 2 * 16) and len(feats) == 2          # 2 heads x 16 image tokens (8x8, patch 2)
    opt = torch.optim.SGD([p for p in disc.parameters() if p.requires_grad], lr=0.1)
    logits.sum().backward()
    opt.step()
    assert not any(p.requires_grad for p in teacher.transformer.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.transformer.state_dict().items())
    moved = not torch.equal(bb.blocks[0].ff.net[0].proj.weight,
                            teacher.transformer.transformer_blocks[0].ff.net[0].proj.weight)
    assert moved == (backbone == "trainable")
    with pytest.raises(UserError, match="disc_blocks"):
        TransformerDiscriminator(teacher.transformer, blocks=4)


def test_resampled_adversarial_windows_follow_window_probs():
    k = torch.randint(4, (64,), generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    picked = torch.cat([k[resample_windows(k, probs, 64, gen)] for _ in range(300)])
    freq = torch.bincount(picked, minlength=4).double() / len(picked)
    assert torch.allclose(freq, probs, atol=0.01)


def test_zero_window_probs_draw_only_their_windows_and_none_from_a_batch_without_them():
    """window_probs [0, 0, 0, 1] (the clean end only): GAN rows come from the last window alone, and a batch
    with no last-window row gives no GAN rows (that step skips the GAN) instead of a multinomial error."""
    probs = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    k = torch.tensor([0, 1, 3, 2, 3, 0])
    assert set(k[resample_windows(k, probs, 32, gen)].tolist()) == {3}
    assert len(resample_windows(torch.tensor([0, 1, 2, 2, 1, 0]), probs, 32, gen)) == 0


def flowsteer_setup(lambda_adv=0.5, lambda_fm=0.25, window_probs=(0.4, 0.2, 0.2, 0.2), disc_blocks=1):
    cfg = toy_cfg(adversarial={"lambda_adv": lambda_adv, "lambda_fm": lambda_fm, "disc_blocks": disc_blocks,
                               "window_probs": list(window_probs)})
    teacher = make_toy_teacher("cpu", layers=2)
    g = torch.Generator().manual_seed(5)
    seg = {"z_start": torch.randn(4, 1, 8, 8, generator=g), "z_end": torch.randn(4, 1, 8, 8, generator=g),
           "k": torch.tensor([0, 1, 2, 3]), "cond": teacher.encode(["p", "q", "r", "s"]),
           "guidance": torch.full((4,), 4.0), "online_mask": torch.tensor([False, False, False, True])}
    w = fixed_sigmas(4, 3.0)
    seg.update(sigma_start=w[seg["k"]], sigma_end=w[seg["k"] + 1])
    method = make_method("flowsteer", cfg, FixedSegments(seg), teacher=teacher)
    student = method.make_student(teacher.transformer)
    return method, student, teacher


def test_flowsteer_gradients_reach_only_their_own_player():
    method, student, _ = flowsteer_setup()
    disc = method.discriminator()
    batch = method.batch(step=0)
    assert len(batch["adv_rows"]) == 4                              # adv_fraction 1.0 (default) of a batch of 4
    with frozen(disc.parameters()):                                 # as the trainer runs the G step
        losses = method.generator_losses(student, batch, step=0)
        losses["loss"].backward()
    assert set(losses) >= {"loss", "distill", "adv", "fm", "online_share"}
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())    # restored after G's forward
    student.zero_grad(set_to_none=True)

    d_losses = method.discriminator_losses(student, batch, step=0)
    d_losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_flowsteer_fake_is_the_students_one_step_jump_and_d_loss_is_the_hinge_on_it():
    method, _, teacher = flowsteer_setup()
    field = LinearField(0.5)
    batch = method.batch(step=0)
    rows = batch["adv_rows"]
    s_s, s_e = batch["sigma_start"][rows], batch["sigma_end"][rows]
    z_s, cond = batch["z_start"][rows], {k: v[rows] for k, v in batch["cond"].items()}
    fake = method.one_step_jump(field, z_s, s_s, s_e, cond)
    gap = (s_e - s_s).reshape(-1, 1, 1, 1)
    assert torch.allclose(fake, z_s + gap * 0.5 * z_s)             # z_s + (s_e - s_s) v(z_s), v = 0.5 z

    method.disc.eval()      # spectral norm's power iteration moves in train mode; freeze it to compare calls
    with torch.no_grad():
        d_real = method.disc(batch["z_end"][rows], s_e, cond)
        d_fake = method.disc(fake, s_e, cond)
        d = method.discriminator_losses(field, batch, step=0)
    assert d["loss"].item() == pytest.approx((torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()).item(),
                                             rel=1e-5)
    assert d["logit_real"].item() == pytest.approx(d_real.mean().item(), rel=1e-5)
    assert d["logit_fake"].item() == pytest.approx(d_fake.mean().item(), rel=1e-5)
    assert d["acc_real"].item() == pytest.approx((d_real.mean(1) > 0).float().mean().item())
    assert d["acc_fake"].item() == pytest.approx((d_fake.mean(1) < 0).float().mean().item())


def test_flowsteer_without_adversarial_terms_is_ota():
    method, student, teacher = flowsteer_setup(lambda_adv=0.0, lambda_fm=0.0)
    ota = make_method("ota", method.ctx.cfg, method.ctx.rows, teacher=teacher)
    batch_f = method.batch(step=0)
    batch_o = ota.batch(step=0)
    ota.ctx.step_rng.set_state(method.ctx.step_rng.get_state())   # same chord-time draw
    lf = method.generator_losses(student, batch_f, step=0)
    lo = ota.generator_losses(student, batch_o, step=0)
    assert lf["loss"].item() == pytest.approx(lo["loss"].item(), rel=1e-6)
    assert "adv" not in lf


def test_flowsteer_checks_its_config():
    with pytest.raises(UserError, match="window_probs"):
        flowsteer_setup(window_probs=(0.5, 0.5))
    with pytest.raises(UserError, match="disc_blocks"):
        flowsteer_setup(disc_blocks=3)


# ---------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A generated toy trajectory store (the generate stage on the toy teacher) and its config."""
    from conftest import generated_toy

    train = {"online_fraction": 0.5, "adversarial": {"disc_blocks": 1, "lambda_adv": 0.1, "lambda_fm": 0.1}}
    return generated_toy(tmp_path_factory, "methods", {"train": train}, "toy.yaml")[2]


@pytest.mark.parametrize("name", ["perflow", "ota", "flowsteer"])
def test_methods_train_through_the_trainer(toy_run, name):
    from pipeline.store import TrajectoryStore
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer

    teacher = load_teacher(toy_run)
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    trainer = Trainer(toy_run, name, teacher, TrajectoryStore.open(toy_run.stage_dir("generate")), "cpu")
    student0 = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    disc0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()} if trainer.disc is not None else None
    for _ in range(2):
        values = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert any(not torch.equal(student0[k], v) for k, v in trainer.student.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in teacher.transformer.state_dict().items())
    if name == "perflow":
        assert (trainer.disc is None) and "online_share" not in values
    else:
        assert values["online_share"] == pytest.approx(0.5)
    if name == "flowsteer":
        assert {"d_loss", "d_logit_real", "d_logit_fake", "adv", "fm"} <= set(values)
        assert any(not torch.equal(disc0[k], v) for k, v in trainer.disc.state_dict().items())
