"""Does the discriminator separate real from fake? Train it ALONE on a trajectory store and print accuracy.

real = the teacher's cached window ends z_e (at sigma_e); fake = the one-step jump of the student at its
initialisation (= the teacher) from the same authentic window start -- what FlowSteer's D sees at step 0 --
or the real window end perturbed by Gaussian noise (`--fake perturbed`). Each variant (backbone frozen or
trainable, spectral norm on/off, learning rate, hinge on per-token logits or on their mean) trains for
--steps steps on fresh batches; printed: d_loss, accuracy on real / fake over the last 20 steps.

    PYTHONPATH=. python bench/disc_separation.py -c run.yaml --steps 300
    PYTHONPATH=. python bench/disc_separation.py -c run.yaml --rms --student <export>/transformer

--rms trains nothing: per window, the rms of (fake - real) and of the real state over 64 rows, for the
teacher's and the student's one-step jumps (how much there is to tell apart at each window end).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from schemas.config import load_config  # noqa: E402

VARIANTS = {   # name: (backbone, spectral_norm, lr, per-token hinge)
    "before: trainable+SN, lr 2e-4, mean logit": ("trainable", True, 2e-4, False),
    "trainable, no SN, lr 2e-4": ("trainable", False, 2e-4, True),
    "frozen+SN heads, lr 2e-4": ("frozen", True, 2e-4, True),
    "frozen heads, lr 2e-4": ("frozen", False, 2e-4, True),
    "frozen heads, lr 1e-3": ("frozen", False, 1e-3, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fake", choices=["jump", "perturbed"], default="jump")
    ap.add_argument("--noise", type=float, default=0.1, help="perturbed: std of the added noise")
    ap.add_argument("--only", nargs="*", help="variant names (substrings) to run")
    ap.add_argument("--rms", action="store_true", help="print per-window rms of fake - real; train nothing")
    ap.add_argument("--student", help="jump: an exported student's transformer dir (default: the teacher = step 0)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config)

    from pipeline.data import RowSource
    from pipeline.methods.discriminator import TransformerDiscriminator, accuracy, hinge_d_loss, sample_logits
    from pipeline.sampling import euler  # noqa: F401
    from pipeline.teachers import load_teacher
    from pipeline.teachers.base import sd3_velocity
    from stages.train import open_store

    teacher, store = load_teacher(cfg), open_store(cfg)
    jumper = teacher.transformer
    if args.student:
        from diffusers import SD3Transformer2DModel
        jumper = SD3Transformer2DModel.from_pretrained(args.student).eval()
    adv = cfg.train.adversarial
    if args.rms:
        rows = RowSource(cfg, store, teacher.sample_shape, seed=0)
        for k in range(cfg.schedule.windows):
            probs = torch.zeros(cfg.schedule.windows, dtype=torch.float64)
            probs[k] = 1
            b = rows.at(k).segments(64, window_probs=probs)
            with torch.no_grad():
                for name, net in (("teacher", teacher.transformer), ("student", jumper)):
                    v = sd3_velocity(net, b["z_start"], b["sigma_start"], b["cond"])
                    fake = b["z_start"] + (b["sigma_end"] - b["sigma_start"]).view(-1, 1, 1, 1) * v
                    print(f"window {k} (ends at sigma {float(b['sigma_end'][0]):.3f}) {name:8s} jump: rms(fake - real) "
                          f"{float((fake - b['z_end']).pow(2).mean().sqrt()):.4f}, rms(real) "
                          f"{float(b['z_end'].pow(2).mean().sqrt()):.3f}", flush=True)
        return
    probs = torch.tensor(adv.window_probs, dtype=torch.float64)
    for name, (backbone, sn, lr, per_token) in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        torch.manual_seed(0)
        rows = RowSource(cfg, store, teacher.sample_shape, seed=0)
        disc = TransformerDiscriminator(teacher.transformer, adv.disc_blocks, spectral_norm=sn, backbone=backbone)
        params = [p for p in disc.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
        hist, t0 = [], time.perf_counter()
        for step in range(args.steps):
            b = rows.at(step).segments(args.batch, window_probs=probs)
            real, s_s, s_e = b["z_end"], b["sigma_start"], b["sigma_end"]
            with torch.no_grad():
                if args.fake == "jump":
                    v = sd3_velocity(jumper, b["z_start"], s_s, b["cond"])
                    fake = b["z_start"] + (s_e - s_s).view(-1, 1, 1, 1) * v
                else:
                    fake = real + args.noise * torch.randn_like(real)
            both = {k: torch.cat([v, v]) for k, v in b["cond"].items()}
            logits = disc(torch.cat([real, fake]), torch.cat([s_e, s_e]), both)
            lr_, lf = logits[:len(real)], logits[len(real):]
            loss = hinge_d_loss(lr_, lf) if per_token else hinge_d_loss(sample_logits(lr_), sample_logits(lf))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ar, af = accuracy(lr_.detach(), lf.detach())
            hist.append((float(loss.detach()), float(ar), float(af), float(sample_logits(lr_).mean()),
                         float(sample_logits(lf).mean())))
        last = torch.tensor(hist[-20:]).mean(0).tolist()
        first = torch.tensor(hist[:20]).mean(0).tolist()
        print(f"{name:45s} d_loss {first[0]:.3f} -> {last[0]:.3f}  acc_real {last[1]:.2f} acc_fake {last[2]:.2f}  "
              f"logit real {last[3]:+.3f} fake {last[4]:+.3f}  ({(time.perf_counter() - t0) / args.steps:.2f} s/step)",
              flush=True)


if __name__ == "__main__":
    main()
