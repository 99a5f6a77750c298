"""Frechet distance of students to the teacher's own samples vs to real digits (classifier features).

Why: FID against real data rewards a student for leaving a CFG-shifted teacher; distance to the teacher's
32-step samples measures how well distillation reproduces the teacher. Run after `make demo`:
    python bench/fid_vs_teacher.py perflow ota flowsteer
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
from schemas.config import load_config
from pipeline.teachers import load_teacher
from pipeline.metrics.classifier import load_classifier
from pipeline.metrics.frechet import frechet_from_features
from pipeline.student import load_student
from pipeline.seeds import noise_for
from pipeline.digits import DIGIT_PROMPTS, load_digits
cfg = load_config(Path(__file__).resolve().parent.parent / "schemas" / "example.yaml")
teacher = load_teacher(cfg)
clf = load_classifier(cfg.stage_dir("teacher"), "cpu")
t = np.load(cfg.stage_dir("evaluate") / "teacher" / "outputs" / "seed0.npz")
xt = torch.as_tensor(t["x"]); pi = t["prompt_index"]; seeds = t["noise_seeds"]
noise = torch.stack([noise_for(int(s), (1, 32, 32)) for s in seeds])
cond = teacher.encode([DIGIT_PROMPTS[i] for i in pi])
feat = lambda x: clf.features(teacher.decode(x)).detach().numpy()
ft = feat(xt)
real, _ = load_digits(); fr = feat(real)
print(f"teacher32 vs real FD {frechet_from_features(ft, fr):.2f}")
for m in sys.argv[1:]:
    st = load_student(cfg.train_dir(cfg.train_run(m)) / "export", "cpu")
    for nfe in (1, 4):
        with torch.no_grad():
            xs = torch.cat([st.sample(noise[i:i+250], {k: v[i:i+250] for k, v in cond.items()}, nfe) for i in range(0, 1000, 250)])
        fs = feat(xs)
        print(f"{m:10s} nfe {nfe}: FD vs teacher32 {frechet_from_features(fs, ft):7.2f}   FD vs real {frechet_from_features(fs, fr):7.2f}   MSE vs teacher {((xs-xt)**2).mean():.4f}")
