"""SCFlow: pseudo-Huber, truncation, target EMA, ground truth from the trajectory, resume without the
public code's teacher/EMA bugs, and its sampler; on real toy-teacher trajectories through the real RowSource and TeacherSolves."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.data import RowSource, Windows
from pipeline.errors import UserError
from pipeline.methods import get_method
from pipeline.methods.base import MethodContext
from pipeline.methods.scflow import consistency, pseudo_huber, truncated_target
from pipeline.sampling import euler, guided
from pipeline.schedule import fixed_sigmas
from pipeline.teacher_solves import TeacherSolves
from pipeline.teachers.toy import make_toy_teacher
from schemas.config import RunConfig

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def toy_cfg(**train) -> RunConfig:
    return RunConfig.model_validate({
        "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher"},
        "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
        "train": {"batch_size": 4, "adversarial": {"disc_blocks": 1}, **train}})


def build_store(directory, cfg, teacher, samples: int = 6, seed: int = 0):
    """A real trajectory store holding the toy teacher's own CFG Euler solves on the fixed grid (what
    generate writes), made with TeacherSolves.teacher_window."""
    from pipeline.store import TrajectoryStore

    g = torch.Generator().manual_seed(seed)
    plan = {"prompt_index": np.arange(samples) % len(PROMPTS), "seed": np.arange(samples),
            "guidance": (3 + 2 * torch.rand(samples, generator=g)).numpy()}
    cond = teacher.encode(PROMPTS)
    store = TrajectoryStore.create(directory / "store.zarr", {"test": "h7"}, PROMPTS, teacher.sample_shape, samples,
                                   cfg.schedule.teacher_steps, cfg.schedule.windows, plan, cond, teacher.encode([""]))
    solver = TeacherSolves(teacher, None, "cpu", Windows.of(cfg))
    rows = {k: v[plan["prompt_index"]] for k, v in cond.items()}
    states = [torch.randn(samples, *teacher.sample_shape, generator=g)]
    for k in range(cfg.schedule.windows):
        states.append(solver.teacher_window(states[-1], k, rows, torch.as_tensor(plan["guidance"])))
    store.write_shard(0, torch.stack(states, 1).numpy())
    return TrajectoryStore.open(directory / "store.zarr", check_complete=False)   # no runner record here


def all_states(store) -> torch.Tensor:
    return torch.as_tensor(np.asarray(store.states[:]))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    cfg = toy_cfg()
    teacher = make_toy_teacher("cpu")
    return cfg, teacher, build_store(tmp_path_factory.mktemp("store"), cfg, teacher)


def make_method(name, cfg, teacher, store, options=None, seed=0):
    """A registered method on the toy store, its streams seeded from `seed` (shared with test_ayf)."""
    rows = RowSource(cfg, store, teacher.sample_shape, seed)
    ctx = MethodContext(cfg=cfg, teacher=teacher, rows=rows, solves=TeacherSolves(teacher, store, "cpu", rows.windows),
                        edges=rows.windows.edges, device=torch.device("cpu"),
                        step_rng=torch.Generator().manual_seed(seed), options=options or {})
    return get_method(name)(ctx)


def make_scflow(cfg, teacher, store, options=None, seed=0):
    return make_method("scflow", cfg, teacher, store, options, seed)


# ---------------------------------------------------------------- loss pieces on hand values
def test_pseudo_huber_hand_values():
    a = torch.tensor([[0.03, -0.04], [0.0, 1.0]])
    b = torch.zeros(2, 2)
    # sqrt(d^2 + c^2) - c per element, mean: 0.0216228, 0.0312311, 0, 0.99005 (worked out by hand)
    assert pseudo_huber(a, b, 0.01).item() == pytest.approx((0.0216228 + 0.0312311 + 0 + 0.99005) / 4, abs=1e-6)
    assert pseudo_huber(b, a, 0.01).item() == pytest.approx(pseudo_huber(a, b, 0.01).item())


def test_consistency_loss_targets_the_ema_one_teacher_step_towards_the_data(toy):
    """L_con = PH(f(z_t, t), f_ema(z_t - dn v_T, t - dn)): built by hand from the replayed draws; a target one
    step AWAY from the data (z_t + dn v_T, a sign error) or the bidirectional one gives another value."""
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store, options={"lambda_gan": 0.0, "tau": 0.0, "warmup_bi": 10})
    student = method.make_student(teacher.transformer)
    with torch.no_grad():                           # a target EMA that differs from the student
        for p in method.target.values():
            p.add_(0.05 * torch.randn_like(p))
    batch = method.batch(0)
    state = method.ctx.step_rng.get_state()
    con = method.generator_losses(student, batch, step=0)["con"]
    g = torch.Generator().set_state(state)
    z_t, t, cond = batch["z_t"], batch["t"], batch["cond"]
    u1, u2 = torch.rand(len(t), generator=g), torch.rand(len(t), generator=g)
    dn = u1 * t.clamp(max=method.options["delta"])
    vel = lambda m: (lambda x, s, c: method.velocity(m, x, s, c))
    target = copy.deepcopy(student)                 # the target network: the student with the target's weights
    target.load_state_dict(method.target, strict=False)
    with torch.no_grad():
        v_T = guided(teacher.velocity, batch["null_cond"], batch["guidance"])(z_t, t, cond)
        f_t = consistency(vel(student), z_t, t, cond)
        back = z_t - dn.view(-1, 1, 1, 1) * v_T
        want = pseudo_huber(f_t, consistency(vel(target), back, t - dn, cond), method.options["huber_c"])
        wrong_sign = z_t + dn.view(-1, 1, 1, 1) * v_T
        flipped = pseudo_huber(f_t, consistency(vel(target), wrong_sign, t - dn, cond), method.options["huber_c"])
    assert con.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(flipped.item() - want.item()) > 1e-3 * want.item()


def test_consistency_function_and_truncation_switch():
    z, t = torch.tensor([[2.0], [4.0]]), torch.tensor([0.5, 0.25])
    f = consistency(lambda x, s, c: 3 * x, z, t, {})
    assert torch.allclose(f, torch.tensor([[2 - 0.5 * 6], [4 - 0.25 * 12]]))
    tgt_m, z0 = torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[-1.0], [-2.0], [-3.0]])
    out = truncated_target(tgt_m, z0, torch.tensor([0.39, 0.4, 0.1]), tau=0.4)
    assert out.flatten().tolist() == [-1.0, 20.0, -3.0]          # strictly below tau takes the ground truth


def test_unknown_option_is_a_user_error(toy):
    with pytest.raises(UserError, match="unknown option"):
        make_scflow(*toy, options={"detla": 0.2})


# ---------------------------------------------------------------- data: where z_t and z0 come from
def test_batch_points_lie_on_the_chord_of_cached_trajectory_states(toy):
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store, options={"lambda_gan": 0.0})
    b = method.batch(0)
    w = method.ctx.edges
    k = b["k"]
    assert ((b["t"] <= w[k]) & (b["t"] >= w[k + 1])).all()
    # z_end is a cached state; z_t lies on the segment between two consecutive cached states
    cached = all_states(store)
    for i in range(len(k)):
        hits = (cached[:, k[i] + 1] - b["z_end"][i]).flatten(1).abs().amax(1) < 1e-6
        assert hits.any()
        z_s = cached[hits.nonzero()[0, 0], k[i]]
        lam = (b["t"][i] - w[k[i]]) / (w[k[i] + 1] - w[k[i]])
        assert torch.allclose(b["z_t"][i], z_s + lam * (b["z_end"][i] - z_s), atol=1e-5)


def test_truncation_ground_truth_is_the_trajectorys_cached_final_state(toy):
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store)
    states = all_states(store)
    k = torch.tensor([0, 1, 2, 3, 1, 2])
    rows = torch.arange(6)
    cond = store.cond(store.prompt_index)
    need = torch.tensor([True, True, True, True, False, True])
    z0 = method._final_states(states[rows, k + 1], k, cond, torch.as_tensor(store.guidance), need)
    final = states[:, -1]
    assert torch.allclose(z0[need], final[need], atol=1e-5)        # rolled on by the teacher = the cached end
    assert torch.equal(z0[4], states[4, 2])                          # rows that do not need it are untouched


# ---------------------------------------------------------------- losses, warm-ups, gradient routing
def test_loss_terms_switch_on_after_their_warmups_and_sum_with_weights(toy):
    cfg, teacher, store = toy
    opts = {"warmup_rf": 1, "warmup_bi": 2, "warmup_gan": 3, "lambda_rf": 0.3, "lambda_bi": 0.2, "lambda_gan": 0.1}
    method = make_scflow(cfg, teacher, store, options=opts)
    student = method.make_student(teacher.transformer)
    seen = {}
    for step in range(5):
        batch = method.batch(step)
        losses = method.generator_losses(student, batch, step)
        seen[step] = set(losses)
        want = losses["con"] + sum(opts[f"lambda_{n}"] * losses[n] for n in ("rf", "bi", "gan") if n in losses)
        assert torch.allclose(losses["loss"], want)
    assert seen[0] == {"loss", "con"} and seen[1] == {"loss", "con"}
    assert seen[2] == {"loss", "con", "rf"} and seen[3] == {"loss", "con", "rf", "bi"}
    assert seen[4] == {"loss", "con", "rf", "bi", "gan"}
    d = method.discriminator_losses(student, batch, 4)
    # the discriminator's logits and accuracies, logged like flowsteer's (the report's D columns)
    assert set(d) == {"loss", "logit_real", "logit_fake", "acc_real", "acc_fake", "acc_pair"}
    assert all(0 <= float(d[k]) <= 1 for k in ("acc_real", "acc_fake", "acc_pair"))


def test_reflow_target_is_the_students_own_one_step_output(toy):
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store, options={"lambda_gan": 0.0})
    student = method.make_student(teacher.transformer)
    z1 = torch.randn(3, 1, 8, 8)
    cond = teacher.encode(PROMPTS)
    with torch.no_grad():
        x0 = consistency(lambda x, s, c: method.velocity(student, x, s, c), z1, torch.ones(3), cond)
    # the loss is zero at a student whose f(z~, t) equals x0_one for every t: check it against a hand MSE
    g = method.ctx.step_rng
    state = g.get_state()
    loss = method.reflow_loss(student, x0, z1, cond)
    g.set_state(state)
    t = torch.rand(3, generator=g)
    zt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z1
    with torch.no_grad():
        f = zt - t.view(-1, 1, 1, 1) * method.velocity(student, zt, t, cond)
    assert loss.item() == pytest.approx(float(((f - x0) ** 2).mean()), rel=1e-5)


def test_target_ema_update_hand_value(toy):
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store, options={"target_decay": 0.9, "lambda_gan": 0.0})
    student = method.make_student(teacher.transformer)
    name, p = next(iter(student.named_parameters()))
    old = method.target[name].detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    method.after_step(student, 0)
    assert torch.allclose(method.target[name], 0.9 * old + 0.1 * (old + 1.0), atol=1e-6)


# ---------------------------------------------------------------- resume: the public code's bugs
def test_resume_keeps_the_teacher_and_restores_the_exact_target_ema(toy):
    from pipeline.trainer import Trainer

    cfg, teacher, store = toy
    cfg = toy_cfg(method_options={"scflow": {"warmup_rf": 0, "warmup_bi": 0, "warmup_gan": 0}}, lr=1e-2)
    original = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    run = Trainer(cfg, "scflow", teacher, store, "cpu")
    # the target EMA starts as the student AFTER its init from the teacher (not a random-init net)
    assert all(torch.equal(v, original[k]) for k, v in run.method.target.items())
    for _ in range(2):
        run.train_step()
    state = copy.deepcopy({**run.state_dict(), "step": run.step})
    saved_target = state["ranks"][0]["method"]["target"]
    assert any(not torch.equal(v, original[k]) for k, v in saved_target.items())   # the EMA moved

    resumed = Trainer(cfg, "scflow", teacher, store, "cpu")
    resumed.load_state_dict(state)
    assert all(torch.equal(v, original[k]) for k, v in teacher.transformer.state_dict().items())
    assert all(torch.equal(v, saved_target[k]) for k, v in resumed.method.target.items())
    params = dict(resumed.student.named_parameters())
    assert all(v.data_ptr() != params[k].data_ptr() for k, v in resumed.method.target.items())
    assert resumed.method.ctx.teacher.transformer is teacher.transformer
    # the next step is identical in the original run and the resumed one
    a, b = run.train_step(), resumed.train_step()
    assert a == pytest.approx(b, rel=1e-5)
    for (k, v), w in zip(run.method.target.items(), resumed.method.target.values()):
        assert torch.allclose(v, w, atol=1e-6), k


def test_target_loaded_before_make_student_is_kept(toy):
    cfg, teacher, store = toy
    method = make_scflow(cfg, teacher, store)
    student = method.make_student(teacher.transformer)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    method.after_step(student, 0)
    state = copy.deepcopy(method.state_dict())
    fresh = make_scflow(cfg, teacher, store)
    fresh.load_state_dict(state)
    fresh.make_student(teacher.transformer)
    assert all(torch.equal(v, state["target"][k]) for k, v in fresh.target.items())


# ---------------------------------------------------------------- sampling
def test_sampler_is_euler_on_the_fixed_grid_and_equals_multistep_consistency(toy):
    cfg, teacher, store = toy
    Cls = get_method("scflow")
    student = copy.deepcopy(teacher.transformer)
    noise, cond = torch.randn(3, 1, 8, 8), teacher.encode(PROMPTS)
    vel = lambda x, s, c: Cls.velocity(student, x, s, c)  # noqa: E731
    for nfe in (1, 3, 4):
        out = Cls.sample(student, noise, cond, nfe, num_windows=4, shift=3.0)
        sig = fixed_sigmas(nfe, 3.0)
        assert torch.allclose(out, euler(vel, noise, sig, cond), atol=1e-6)
        x = noise                                            # x0^ = f(x, t), eps^ = x + (1 - t) v, renoise to s
        with torch.no_grad():
            for t, s in zip(sig[:-1], sig[1:]):
                v = vel(x, t.expand(3), cond)
                x = (1 - s) * (x - t * v) + s * (x + (1 - t) * v)
        assert torch.allclose(out, x, atol=1e-5)


def test_lora_student_gets_a_matching_target_and_resumes_it(toy):
    from pipeline.trainer import Trainer

    _, teacher, store = toy
    cfg = toy_cfg(student={"kind": "lora", "rank": 2}, lr=1e-2, method_options={"scflow": {"lambda_gan": 0.0}})
    # each trainer its own (identical) teacher: a LoRA student lives on its teacher's transformer
    run = Trainer(cfg, "scflow", make_toy_teacher("cpu"), store, "cpu")
    run.train_step()
    keys = run.student_state().keys()
    assert run.method.target.keys() == keys and keys and all("lora" in k for k in keys)   # adapters only
    state = copy.deepcopy({**run.state_dict(), "step": run.step})
    resumed = Trainer(cfg, "scflow", make_toy_teacher("cpu"), store, "cpu")
    resumed.load_state_dict(state)
    assert run.train_step() == pytest.approx(resumed.train_step(), rel=1e-5)
    for k, v in run.method.target.items():
        assert torch.allclose(v, resumed.method.target[k], atol=1e-6), k
    run.close()
    resumed.close()
