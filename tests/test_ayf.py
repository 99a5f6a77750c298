"""Align Your Flow (EMD): tangent normalisation, JVP vs finite difference, flow-map properties, autoguidance,
export round trip and the chained sampler; on the toy teacher with tiny tensors."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import UserError
from pipeline.methods import ayf
from pipeline.methods.ayf import FlowMapTransformer, flow_map, jvp_fd, jvp_torch, normalised_tangent
from pipeline.methods import get_method
from tests.test_scflow import PROMPTS, make_method, toy, toy_cfg  # noqa: F401 (toy: shared fixture)


def make_ayf(cfg, teacher, store, options=None, seed=0):
    return make_method("ayf-emd", cfg, teacher, store, options, seed)


def trained_looking(teacher, seed=1):
    """A flow map whose gap embedding is no longer zero, so F really depends on s."""
    student = FlowMapTransformer(copy.deepcopy(teacher.transformer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.gap_embed.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return student.eval()


def inputs(teacher, n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.tensor([0.9, 0.6, 0.3])[:n], torch.tensor([0.4, 0.0, 0.1])[:n], v, teacher.encode(PROMPTS[:n])


# ---------------------------------------------------------------- the loss's pieces on hand values
def test_tangent_and_normalisation_hand_values():
    F_m = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    dF = torch.tensor([[3.0, 0.0], [6.0, 8.0]])
    t, s = torch.tensor([0.5, 1.0]), torch.tensor([0.1, 0.5])
    g = normalised_tangent(F_m, v, dF, t, s, r=0.5, c=0.1)
    # row 0: 1 + 0.5 * 0.4 * 3 = 1.6 -> 1.6 / 1.7; row 1: 0.5 * 0.5 * (6, 8) = (1.5, 2) -> norm 2.5 -> / 2.6
    assert torch.allclose(g, torch.tensor([[1.6 / 1.7, 0.0], [1.5 / 2.6, 2.0 / 2.6]]))


def test_loss_value_is_mean_squared_normalised_tangent_and_warmup_scales_the_jvp_term(toy):
    cfg, teacher, store = toy
    method = make_ayf(cfg, teacher, store, options={"tangent_warmup": 4})
    student = trained_looking(teacher).train()
    batch = method.batch(0)
    gen_state = method.ctx.step_rng.get_state()
    losses = method.generator_losses(student, batch, step=2)            # r = 2 / 4
    method.ctx.step_rng.set_state(gen_state)                          # the same autoguidance lambda
    v = method.teacher_velocity(batch["x_t"], batch["t"], batch["cond"], batch["guidance"], batch["null_cond"])
    with torch.no_grad():
        F_m, dF = jvp_torch(lambda a, b, c: student(a, b, c, batch["cond"]), batch["x_t"], batch["t"], batch["s"], v)
    g = normalised_tangent(F_m, v, dF, batch["t"], batch["s"], 0.5, 0.1)
    assert losses["loss"].item() == pytest.approx(float(g.square().mean()), rel=1e-4)
    losses["loss"].backward()
    assert student.gap_embed.linear_2.weight.grad.abs().sum() > 0     # s conditioning is trained
    # |g|^2 does not see g's sign; the update does: a small step must move F against g (towards Fm - g).
    # A target Fm + g (a sign error) moves F along g and fails here.
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
        F_new = student(batch["x_t"], batch["t"], batch["s"], batch["cond"])
    assert float(((F_new - F_m) * g).sum()) < 0


def test_autoguidance_mixes_teacher_and_weak_teacher(toy):
    cfg, teacher, store = toy
    method = make_ayf(cfg, teacher, store, options={"autoguidance": [1.0, 3.0], "guidance": "auto"})
    x, t, _, _, cond = inputs(teacher)
    state = method.ctx.step_rng.get_state()
    v = method.teacher_velocity(x, t, cond, torch.full((3,), 4.0), None)
    method.ctx.step_rng.set_state(state)
    lam = (1 + 2 * torch.rand(3, generator=method.ctx.step_rng)).view(-1, 1, 1, 1)
    assert ((lam >= 1) & (lam <= 3)).all()
    with torch.no_grad():
        want = lam * teacher.velocity(x, t, cond) + (1 - lam) * teacher.weak_velocity(x, t, cond)
    assert torch.allclose(v, want, atol=1e-6)


def test_default_target_is_the_same_cfg_field_as_the_other_methods(toy):
    """The ladder compares like with like: AYF distills the teacher with CFG at the row's w by default."""
    cfg, teacher, store = toy
    method = make_ayf(cfg, teacher, store)
    x, t, _, _, cond = inputs(teacher)
    w, null = torch.tensor([3.0, 4.0, 5.0]), teacher.encode([""] * 3)
    v = method.teacher_velocity(x, t, cond, w, null)
    with torch.no_grad():
        v_c, v_u = teacher.velocity(x, t, cond), teacher.velocity(x, t, null)
    assert torch.allclose(v, v_u + w.view(-1, 1, 1, 1) * (v_c - v_u), atol=1e-6)


def test_bad_options_are_user_errors(toy):
    with pytest.raises(UserError, match="jvp"):
        make_ayf(*toy, options={"jvp": "forward"})
    with pytest.raises(UserError, match="unknown option"):
        make_ayf(*toy, options={"warmup": 3})


# ---------------------------------------------------------------- JVP
def test_jvp_agrees_with_finite_difference(toy):
    _, teacher, _ = toy
    student = trained_looking(teacher)
    x, t, s, v, cond = inputs(teacher)
    with torch.no_grad():
        F_ad, d_ad = jvp_torch(lambda a, b, c: student(a, b, c, cond), x, t, s, v)
        F_fd, d_fd = jvp_fd(student, cond, x, t, s, v)
        F_direct = student(x, t, s, cond)
    assert torch.allclose(F_ad, F_direct, atol=1e-5)
    assert torch.allclose(F_fd.float(), F_direct, atol=1e-5)
    # diffusers casts the timestep to float32 inside its sinusoidal embedding, so FD is good to ~1e-3 here
    rel = (d_ad - d_fd.float()).norm() / d_ad.norm()
    assert rel < 1e-2, rel


def test_auto_jvp_falls_back_to_finite_difference(toy, monkeypatch):
    cfg, teacher, store = toy
    method = make_ayf(cfg, teacher, store, options={"jvp": "auto"})
    student = trained_looking(teacher)
    x, t, s, v, cond = inputs(teacher)
    want = method.tangent(student, x, t, s, v, cond)
    assert method._jvp == "auto"

    def no_forward_ad(*a, **k):
        raise NotImplementedError("trying to use forward AD with an op that does not support it")
    monkeypatch.setattr(ayf, "jvp_torch", no_forward_ad)
    got = method.tangent(student, x, t, s, v, cond)
    assert method._jvp == "fd"
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert (got[1] - want[1]).norm() / want[1].norm() < 1e-2
    strict = make_ayf(cfg, teacher, store, options={"jvp": "torch"})
    with pytest.raises(NotImplementedError):
        strict.tangent(student, x, t, s, v, cond)


# ---------------------------------------------------------------- flow-map properties
def test_flow_map_at_init_is_the_teacher_velocity_for_any_s(toy):
    cfg, teacher, store = toy
    student = make_ayf(cfg, teacher, store).make_student(teacher.transformer)
    x, t, _, _, cond = inputs(teacher)
    with torch.no_grad():
        v = teacher.velocity(x, t, cond)
        for s in (torch.zeros(3), t * 0.5, t):
            assert torch.equal(student(x, t, s, cond), v)


def test_flow_map_identity_at_s_equal_t_and_its_limit_is_the_velocity(toy):
    _, teacher, _ = toy
    student = trained_looking(teacher).double()        # float64: (f - x) / (s - t) cancels at tiny s - t
    Cls = get_method("ayf-emd")
    x, t, _, _, cond = inputs(teacher)
    x, t, cond = x.double(), t.double(), {k: v.double() for k, v in cond.items()}
    with torch.no_grad():
        assert torch.equal(flow_map(student, x, t, t, cond), x)
        v = Cls.velocity(student, x, t, cond)                        # F(x, t, t)
        assert torch.equal(v, student(x, t, t, cond))
        assert not torch.allclose(student(x, t, t - 0.5, cond), v, atol=1e-3)    # F does depend on s
        errs = []
        for h in (1e-2, 1e-4, 1e-6):        # the gap enters as 1000 (t - s), like SD3's timestep
            s = t - h
            errs.append(float(((flow_map(student, x, t, s, cond) - x) / (s - t).view(-1, 1, 1, 1) - v).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2 * max(1.0, float(v.abs().max()))


# ---------------------------------------------------------------- export and sampling
def test_save_load_round_trip_and_chained_sampler(toy, tmp_path):
    from pipeline.export import export_student
    from pipeline.student import load_student

    cfg, teacher, _ = toy
    student = trained_looking(teacher)
    export_student(tmp_path / "export", "ayf-emd", student, cfg, sample_shape=(1, 8, 8))
    loaded = load_student(tmp_path / "export")
    assert isinstance(loaded.module, FlowMapTransformer)
    noise, cond = torch.randn(3, 1, 8, 8), teacher.encode(PROMPTS)
    Cls = get_method("ayf-emd")
    for nfe in (1, 2, 3):
        out = loaded.sample(noise, cond, nfe)
        assert torch.allclose(out, Cls.sample(student, noise, cond, nfe, 4, 3.0), atol=1e-5)
    one = torch.ones(3)
    with torch.no_grad():
        assert torch.allclose(loaded.sample(noise, cond, 1), flow_map(student, noise, one, 0 * one, cond), atol=1e-5)
    (tmp_path / "export" / "flow_map" / ayf.GAP_FILE).unlink()       # not a drop-in: no transformer/
    with pytest.raises(UserError, match="not an ayf-emd"):
        load_student(tmp_path / "export")


def test_lora_trains_adapters_and_the_gap_embedding_and_exports_merged(toy, tmp_path):
    from pipeline.export import export_student
    from pipeline.student import load_student
    from pipeline.trainer import Trainer

    _, teacher, store = toy
    cfg = toy_cfg(student={"kind": "lora", "rank": 2}, lr=1e-2)
    run = Trainer(cfg, "ayf-emd", teacher, store, "cpu")
    trainable = {n for n, p in run.student.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and any(n.startswith("gap_embed.") for n in trainable)
    assert not any(n.startswith("transformer.") and "lora" not in n for n in trainable)
    run.train_step()
    net = run.ema_student()
    run.close()                           # the adapters leave the shared teacher
    export_student(tmp_path / "export", "ayf-emd", net, cfg, sample_shape=(1, 8, 8))
    noise, cond = torch.randn(2, 1, 8, 8), teacher.encode(PROMPTS[:2])
    out = load_student(tmp_path / "export").sample(noise, cond, 2)
    assert torch.allclose(out, get_method("ayf-emd").sample(net, noise, cond, 2, 4, 3.0), atol=1e-5)
