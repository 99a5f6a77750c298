"""Evaluate stage: score the teacher and every exported student at each NFE on fixed prompts and noise.

Units are (checkpoint, NFE, seed). Two jobs run in order under `cfg.stage_dir("evaluate")`:
  teacher/   the teacher at evaluate.teacher_nfe steps with CFG, one unit per seed; its final samples are
             kept (teacher/outputs/seed<s>.npz) as the target of trajectory fidelity
  students/  every exported student at every NFE in evaluate.nfes, guidance-free, one unit per seed
Each unit writes its score rows to <job>/scores/<unit>.parquet, then its record; `after` gathers every row
into scores.parquet. Rows: (checkpoint, fingerprint, nfe, metric, value, n, seed, ...).
Sample i of seed s starts from `noise_for(noise_seeds(s, n)[i])` and asks for prompt i mod P, for every
checkpoint alike, so students, teacher and the image grids share noise and prompts.
"""
from __future__ import annotations

import functools
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import UserError
from pipeline.files import atomic_path, atomic_write_bytes, temp_name
from pipeline.runner import Job, Unit, is_done
from schemas.config import RunConfig

NOISE_SEED_OFFSET = 1 << 40     # evaluation noise never coincides with the training trajectories' seeds
GRID_IMAGES = 20                # images kept per (checkpoint, nfe) for the report's grids


# ---------------------------------------------------------------- what is evaluated
def noise_seeds(seed: int, n: int) -> np.ndarray:
    """Per-sample noise seeds of evaluation seed `seed`: disjoint sets for different seeds, and above 2^32,
    so never one of the training trajectories' seeds (pipeline.store.sample_seeds are uint32)."""
    return NOISE_SEED_OFFSET + seed * (1 << 24) + np.arange(n, dtype=np.int64)


def student_checkpoints(cfg: RunConfig, methods) -> list[dict]:
    """(label, fingerprint, export dir) of each training run's exported student (run names x train.seeds);
    a UserError names what to train."""
    out = []
    for run in cfg.train_runs(list(methods)):
        train_dir = cfg.train_dir(run)
        if not is_done(train_dir, "export"):
            raise UserError(f"no exported student for run '{run.label}' in {train_dir}: "
                            f"run `flowsteer train -m {run.name}` first")
        out.append({"checkpoint": run.label, "key": run.label.replace("/", "-"),
                    "fingerprint": cfg.fingerprint("train", run), "export": str(train_dir / "export")})
    return out


def reference_kind(cfg: RunConfig) -> str:
    """Which images FID compares against: a configured folder, the real digits, or the teacher's samples."""
    if cfg.evaluate.reference:
        return "folder"
    return "digits" if cfg.teacher.kind == "embedded" else "teacher"


def _check_inputs(cfg: RunConfig) -> None:
    """Problems a user can fix, found before any model is loaded (one line each)."""
    ev = cfg.evaluate
    if ev.features == "inception":
        from pipeline.metrics.fid import resolve_inception

        resolve_inception(ev.inception_path)
    if ev.features == "classifier" and cfg.teacher.kind != "embedded":
        raise UserError("evaluate.features 'classifier' needs the embedded teacher's digit classifier; "
                        "use features: inception (with inception_path) or pixels for other teachers")
    if ev.clip_path:
        from pipeline.metrics.alignment import check_clip_dir

        check_clip_dir(ev.clip_path)
    if ev.reference and not Path(ev.reference).expanduser().is_dir():
        raise UserError(f"evaluate.reference {ev.reference} is not a folder of images")
    bad = [n for n in ev.nfes if n < 1]
    if bad or ev.teacher_nfe < 1 or ev.n_samples < 2:
        raise UserError("evaluate.nfes and teacher_nfe must be >= 1 and n_samples >= 2")


def jobs(cfg: RunConfig, methods=None) -> list[Job]:
    """The teacher job (one unit per seed) and the students job (method x NFE x seed), in that order."""
    _check_inputs(cfg)
    ev, root = cfg.evaluate, cfg.stage_dir("evaluate")
    make = functools.partial(EvalWorker, cfg.model_dump(mode="json"))
    n = ev.n_samples
    tfp = cfg.fingerprint("teacher")
    teacher_units = [Unit(f"teacher-{tfp}_nfe{ev.teacher_nfe}_seed{s}",
                          {"kind": "teacher", "checkpoint": "teacher", "fingerprint": tfp, "nfe": ev.teacher_nfe,
                           "seed": s}, size=n) for s in ev.seeds]
    student_units = [Unit(f"{c['key']}-{c['fingerprint']}_nfe{nfe}_seed{s}",
                          {"kind": "student", **c, "nfe": nfe, "seed": s}, size=n)
                     for c in student_checkpoints(cfg, methods or cfg.train.methods)
                     for nfe in ev.nfes for s in ev.seeds]   # method-major: a local worker loads each once
    common = dict(num_cpus=1, num_gpus=0 if cfg.device == "cpu" else 1, item_name="samples")
    return [Job("evaluate-teacher", root / "teacher", teacher_units, make,
                prepare=functools.partial(prepare_reference, cfg), **common),
            Job("evaluate", root / "students", student_units, make, **common)]


def after(cfg: RunConfig, methods=None) -> str:
    """Gather every unit's rows (all checkpoints ever scored in this directory) into scores.parquet."""
    root = cfg.stage_dir("evaluate")
    table = gather_scores(root)
    _write_parquet(root / "scores.parquet", table)
    return f"evaluate: {table.num_rows} score rows -> {root / 'scores.parquet'}"


def verify_unit(job: Job, unit: Unit) -> str | None:
    """A unit is sound when its score rows (and, for the teacher, its saved samples) read back."""
    try:
        pq.read_table(Path(job.out_dir) / "scores" / f"{unit.key}.parquet")
        if unit.params["kind"] == "teacher":
            with np.load(Path(job.out_dir) / "outputs" / f"seed{unit.params['seed']}.npz") as f:
                f["x"]
    except Exception as exc:  # any unreadable output means the unit must be redone
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- files
def gather_scores(root: Path) -> pa.Table:
    files = sorted(Path(root).glob("*/scores/*.parquet"))
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables) if tables else _schema().empty_table()


def _write_parquet(path: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def digits_reference_dir(cfg: RunConfig) -> Path:
    return cfg.stage_dir("evaluate") / "reference" / "digits"


def prepare_reference(cfg: RunConfig) -> None:
    """Driver side, once: the 5000 real digits as PNGs, the FID reference of the embedded default."""
    if reference_kind(cfg) != "digits":
        return
    out = digits_reference_dir(cfg)
    if (out / "_complete").is_file():
        return
    from pipeline.digits import load_digits
    from pipeline.metrics.fid import write_png_folder

    images, _ = load_digits()
    with atomic_path(out) as tmp:
        write_png_folder((images + 1) / 2, tmp)
        (tmp / "_complete").write_text(f"{len(images)}\n")


def save_grid(images01: torch.Tensor, path: Path, nrow: int) -> None:
    """The first images as a PNG grid plus their uint8 pixels (npz) for the report's comparison figures."""
    from PIL import Image
    from torchvision.utils import make_grid

    from pipeline.metrics.fid import to_uint8

    grid = make_grid(images01.float().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    png, npz = io.BytesIO(), io.BytesIO()
    arr = to_uint8(grid[None])[0]
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(png, format="PNG")
    np.savez(npz, images=to_uint8(images01), nrow=nrow)
    atomic_write_bytes(path.with_suffix(".npz"), npz.getvalue())
    atomic_write_bytes(path.with_suffix(".png"), png.getvalue())


# ---------------------------------------------------------------- the worker
class EvalWorker:
    """Loads the teacher (prompt encoder, decoder), the scorers and each student once per process."""

    def __init__(self, cfg_json: dict):
        from pipeline.metrics.fid import feature_space
        from pipeline.store import generate_prompts
        from pipeline.teachers import load_teacher, resolve_device

        self.cfg = RunConfig.model_validate(cfg_json)
        self.device = resolve_device(self.cfg.device)
        self.teacher = load_teacher(self.cfg, self.device)
        self.prompts = generate_prompts(self.cfg)
        ev = self.cfg.evaluate
        self.classifier = None
        if self.cfg.teacher.kind == "embedded":
            from pipeline.metrics.classifier import load_classifier

            self.classifier = load_classifier(self.cfg.stage_dir("teacher"), self.device)
        self.space = feature_space(ev.features, self.device, self.classifier, ev.inception_path)
        self.clip = None
        if ev.clip_path:
            from pipeline.metrics.alignment import ClipScorer

            self.clip = ClipScorer(ev.clip_path, self.device)
        self.students: dict[str, object] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.root = self.cfg.stage_dir("evaluate")

    def _student(self, export: str):
        if export not in self.students:
            from pipeline.student import load_student

            self.students.clear()          # units are method-major: keep one student in memory
            self.students[export] = load_student(Path(export), self.device)
        return self.students[export]

    @torch.no_grad()
    def generate(self, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """(samples in ODE space, images in [0, 1], prompt index, noise seeds) for one unit."""
        from pipeline.sampling import sample
        from pipeline.schedule import fixed_sigmas
        from pipeline.store import noise_for

        ev, n = self.cfg.evaluate, self.cfg.evaluate.n_samples
        seeds = noise_seeds(p["seed"], n)
        prompt_index = torch.arange(n) % len(self.prompts)
        shape = tuple(self.teacher.sample_shape)
        student = self._student(p["export"]) if p["kind"] == "student" else None
        sigmas = fixed_sigmas(p["nfe"], self.cfg.schedule.shift)
        xs, images = [], []
        for i in range(0, n, ev.batch_size):
            idx = range(i, min(i + ev.batch_size, n))
            noise = noise_for(seeds[idx.start:idx.stop].tolist(), shape).to(self.device)
            cond = self.teacher.encode([self.prompts[int(prompt_index[j])] for j in idx])
            if student is None:
                null = self.teacher.encode([""] * len(idx))
                x = sample(self.teacher.velocity, noise, sigmas, cond, null, ev.guidance)
            else:
                x = student.sample(noise, cond, p["nfe"])
            xs.append(x.float().cpu())
            images.append(self.teacher.decode(x).float().cpu())
        return torch.cat(xs), torch.cat(images), prompt_index, seeds

    def run(self, unit: Unit) -> dict:
        p, ev = unit.params, self.cfg.evaluate
        job_dir = self.root / ("teacher" if p["kind"] == "teacher" else "students")
        t0 = time.time()
        x, images, prompt_index, seeds = self.generate(p)
        t_sample = time.time() - t0
        if p["kind"] == "teacher":
            from pipeline.metrics.fidelity import save_outputs

            save_outputs(job_dir / "outputs" / f"seed{p['seed']}.npz", x, prompt_index, seeds)
        t1 = time.time()
        metrics = self.score(unit, x, images, prompt_index, seeds)
        t_score = time.time() - t1
        if p["seed"] == ev.seeds[0]:
            save_grid(images[:GRID_IMAGES], self.root / "grids" / unit.key, nrow=min(len(self.prompts), 10))
        n = len(images)
        rows = [{"checkpoint": p["checkpoint"], "fingerprint": p["fingerprint"], "nfe": p["nfe"], "metric": m,
                 "value": float(v), "n": n, "seed": p["seed"],
                 "guidance": ev.guidance if p["kind"] == "teacher" else float("nan"),
                 "features": self.space.name, "reference": reference_kind(self.cfg),
                 "sampling_seconds": round(t_sample, 3), "scoring_seconds": round(t_score, 3), "unit": unit.key}
                for m, v in metrics.items()]
        _write_parquet(job_dir / "scores" / f"{unit.key}.parquet",
                       pa.Table.from_pylist(rows, schema=_schema()))
        return {"metrics": {m: round(float(v), 5) for m, v in metrics.items()}, "n": n,
                "sampling_seconds": round(t_sample, 3)}

    def score(self, unit: Unit, x, images, prompt_index, seeds) -> dict[str, float]:
        """FID (clean-fid), prompt alignment, and (students) trajectory fidelity to the teacher's samples."""
        from pipeline.metrics import alignment, fidelity
        from pipeline.metrics.fid import fid_from_features, folder_features, write_png_folder

        p, ev = unit.params, self.cfg.evaluate
        out: dict[str, float] = {}
        teacher_out = self.root / "teacher" / "outputs" / f"seed{p['seed']}.npz"
        ref = self._reference_features(p, teacher_out, seeds)
        if ref is not None:
            tmp = temp_name(self.root / ".tmp" / unit.key)   # this unit's PNGs, only while clean-fid reads them
            try:
                gen = folder_features(write_png_folder(images, tmp), self.space, self.device, ev.batch_size)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            out["fid"] = fid_from_features(gen, ref)
        prompts = [self.prompts[int(i)] for i in prompt_index]
        labels = alignment.digit_labels(prompts)
        if self.classifier is not None and labels is not None:
            out["prompt_accuracy"] = float(alignment.prompt_hits(self.classifier, images,
                                                                 torch.tensor(labels)).mean())
        if self.clip is not None:
            out["clip_score"] = float(self.clip(images, prompts).mean())
        if p["kind"] == "student":
            target = fidelity.load_outputs(teacher_out, seeds)
            out["fidelity_mse"] = float(fidelity.per_sample_mse(x, target).mean())
        return out

    def _reference_features(self, p: dict, teacher_out: Path, seeds) -> np.ndarray | None:
        """Features of the FID reference, extracted once per process (the real digits' also once per run).

        None for the teacher when the reference is the teacher's own samples (FID 0 by construction)."""
        from pipeline.metrics.fid import folder_features, write_png_folder

        kind, ev = reference_kind(self.cfg), self.cfg.evaluate
        if kind == "teacher" and p["kind"] == "teacher":
            return None
        key = f"teacher_seed{p['seed']}" if kind == "teacher" else kind
        if key in self.reference:
            return self.reference[key]
        cache = self.root / "reference" / f"digits_{self.space.name}_features.npy"
        if kind == "digits" and cache.is_file():
            feats = np.load(cache)
        elif kind == "teacher":
            from pipeline.metrics.fidelity import load_outputs

            tmp = temp_name(self.root / ".tmp" / key)
            try:
                images = self.teacher.decode(load_outputs(teacher_out, seeds).to(self.device)).cpu()
                feats = folder_features(write_png_folder(images, tmp), self.space, self.device, ev.batch_size)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            folder = Path(ev.reference).expanduser() if kind == "folder" else digits_reference_dir(self.cfg)
            feats = folder_features(folder, self.space, self.device, ev.batch_size)
            if kind == "digits":
                buf = io.BytesIO()
                np.save(buf, feats)
                atomic_write_bytes(cache, buf.getvalue())
        self.reference[key] = feats
        return feats


@functools.lru_cache(maxsize=1)
def _schema() -> pa.Schema:
    return pa.schema([("checkpoint", pa.string()), ("fingerprint", pa.string()), ("nfe", pa.int64()),
                      ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64()), ("seed", pa.int64()),
                      ("guidance", pa.float64()), ("features", pa.string()), ("reference", pa.string()),
                      ("sampling_seconds", pa.float64()), ("scoring_seconds", pa.float64()), ("unit", pa.string())])
