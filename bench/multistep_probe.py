"""Why do consistency-style students (SCFlow, AYF) get worse with more steps? Samplers and states, measured.

For each named run (its first training seed's export) and each NFE in --nfes, on --n samples (the run's
prompts in turn, noise disjoint from training and evaluation) against the teacher's 32-step output from the
same noise (and, on the exact teacher, the exact ODE endpoint), prints the median and mean squared error and
the mode-switch rate of these samplers:
  own       the method's sampler (deterministic, on the shifted fixed grid)
  uniform   the same steps on an unshifted uniform grid (SCFlow's public code samples its RF pipeline so)
  renoise   consistency multistep sampling (Song et al. 2023, Alg. 1): jump to sigma 0, re-noise to the next
            sigma with FRESH noise (deterministic per sample: a second noise seed), repeat
  anchor    the same, re-noised with the sample's ORIGINAL noise (SCFlow's stochastic sampler at beta = 1)
  (-u: the same on the uniform grid)
and two diagnostics of where the error comes from:
  restart   one jump to sigma 0 from the TEACHER's own state at each grid sigma (the states the method trains
            on): how good the student is on the trajectory
  drift     the squared distance between the student's own state and the teacher's at each sigma of its
            own-sampler path: how far its multi-step path leaves the trajectory it was trained on

    PYTHONPATH=. python bench/multistep_probe.py -c run.yaml --runs scflow,ayf-emd [--n 500] [--nfes 1,2,4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch's CPU generator keeps only the low 32 bits of a seed, so offsets live below 2^32: 3 * 2^30 is above
# evaluation's effective seeds (seed * 2^24 + i for small evaluation seeds) and below 2^32
NOISE_SEED_OFFSET = 3 << 30
FRESH_OFFSET = 1 << 26               # renoise: the fresh noise of step i is seed + (i + 1) * FRESH_OFFSET


def jump(student, x, t, s, cond):
    """The student's move from sigma t to sigma s: its Euler step (velocity students) or its flow map (AYF)."""
    from pipeline.methods.base import Method
    from pipeline.sampling import rowwise

    tt, ss = torch.full((len(x),), float(t)), torch.full((len(x),), float(s))
    if student.meta["method"] == "ayf-emd":
        return x + rowwise(ss - tt, x) * student.module(x, tt, ss, cond)
    return x + rowwise(ss - tt, x) * Method.velocity(student.module, x, tt, cond)


@torch.no_grad()
def samplers(student, noise, cond, sigmas, fresh):
    """(own, renoise, anchor, own path): the method's steps; re-noise the x0 estimate with fresh noise; re-noise
    it with the ORIGINAL noise (SCFlow's `sample_ode_generative_stochastic` at beta = 1: the states stay on
    the line between the sample's noise and the student's x0 estimate, the line SCFlow's reflow loss trains)."""
    own, renoise, anchor = noise, noise, noise
    path = [own]
    for i in range(len(sigmas) - 1):
        own = jump(student, own, sigmas[i], sigmas[i + 1], cond)
        path.append(own)
        s = float(sigmas[i + 1])
        x0 = jump(student, renoise, sigmas[i], 0.0, cond)
        renoise = (1 - s) * x0 + s * fresh[i] if s > 0 else x0
        x0 = jump(student, anchor, sigmas[i], 0.0, cond)
        anchor = (1 - s) * x0 + s * noise if s > 0 else x0
    return own, renoise, anchor, path


def stats(x, ref, teacher, exact_modes):
    err = (x - ref).pow(2).flatten(1).mean(1)
    out = f"median {err.median():.4f} mean {err.mean():.4f}"
    if exact_modes is not None:
        out += f" switch {(teacher.modes_of(x) != exact_modes).float().mean():.3f}"
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--runs", default="scflow,ayf-emd")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--nfes", default="1,2,4")
    args = ap.parse_args(argv)

    from pipeline.sampling import sample
    from pipeline.schedule import fixed_sigmas
    from pipeline.datasets import generate_prompts
    from pipeline.seeds import noise_for
    from pipeline.student import load_student
    from pipeline.teachers import load_teacher
    from schemas.config import load_config

    cfg = load_config(args.config)
    teacher, ev = load_teacher(cfg), cfg.evaluate
    prompts = generate_prompts(cfg)
    chosen = [prompts[i % len(prompts)] for i in range(args.n)]
    seeds = [NOISE_SEED_OFFSET + i for i in range(args.n)]
    noise = noise_for(seeds, tuple(teacher.sample_shape))
    cond, null = teacher.encode(chosen), teacher.encode([""] * args.n)
    grid = fixed_sigmas(ev.teacher_nfe, cfg.schedule.shift)
    states = {}

    def keep(i, x, s, v):
        states[round(float(s), 6)] = x.clone()
    target = sample(teacher.velocity, noise, grid, cond, null, ev.guidance, callback=keep)
    exact = exact_modes = None
    if cfg.teacher.kind == "exact":
        exact = teacher.exact_endpoints(noise, cond, null, ev.guidance, shift=cfg.schedule.shift)
        exact_modes = teacher.modes_of(exact)
        print(f"teacher {ev.teacher_nfe} steps vs exact ODE: {stats(target, exact, teacher, exact_modes)}")
    for name in args.runs.split(","):
        run = cfg.train_run(name)
        student = load_student(cfg.train_dir(run) / "export")
        print(f"\n== {run.label} ({student.meta['method']})")
        for nfe in [int(n) for n in args.nfes.split(",")]:
            fresh = [noise_for([s + (i + 1) * FRESH_OFFSET for s in seeds], tuple(teacher.sample_shape))
                     for i in range(nfe)]
            shifted = fixed_sigmas(nfe, cfg.schedule.shift)
            own, renoise, anchor, path = samplers(student, noise, cond, shifted, fresh)
            uniform, renoise_u, anchor_u, _ = samplers(student, noise, cond, torch.linspace(1, 0, nfe + 1), fresh)
            for label, x in (("own", own), ("uniform", uniform), ("renoise", renoise), ("renoise-u", renoise_u),
                             ("anchor", anchor), ("anchor-u", anchor_u)):
                line = f"{nfe} NFE {label:8s} vs teacher: {stats(x, target, teacher, None)}"
                if exact is not None:
                    line += f" | vs exact: {stats(x, exact, teacher, exact_modes)}"
                print(line)
            drift = [f"{float(s):.3f}: {(x - states[round(float(s), 6)]).pow(2).mean():.4f}"
                     for s, x in zip(shifted[1:-1], path[1:-1]) if round(float(s), 6) in states]
            if drift:
                print(f"{nfe} NFE drift from the teacher's state at sigma " + ", ".join(drift))
        restart = []
        for s in (1.0, 0.9, 0.75, 0.5, 0.25):
            key = min(states, key=lambda k: abs(k - s))
            x0 = jump(student, states[key], key, 0.0, cond)
            restart.append(f"{key:.3f}: {(x0 - target).pow(2).flatten(1).mean(1).median():.4f}")
        print("restart (one jump to 0 from the teacher's state), median error to the teacher: " + ", ".join(restart))


if __name__ == "__main__":
    main()
