"""Evaluate stage: score the teacher and every trained student at each NFE and grid on fixed prompts and noise.

Units are (checkpoint, schedule, NFE, evaluation seed). Two jobs run in order under `cfg.stage_dir("evaluate")`:
  teacher/   the teacher at evaluate.teacher_nfe steps with CFG on the fixed grid, one unit per seed; its final
             samples are kept (teacher/outputs/seed<s>.npz) as the target of trajectory fidelity
  students/  every training run (train.methods x train.seeds, schemas.config.TrainRun) at every NFE in
             evaluate.nfes on every grid in evaluate.schedules ("fixed": the method's own sampler; "diffusers":
             the sigmas of diffusers' default FlowMatchEulerDiscreteScheduler), guidance-free, one unit per seed
The metrics are the registry's (pipeline/metrics/base.py): every one that applies to the run, or those named
in evaluate.metrics. Each unit writes its rows (pipeline/scores.py) to <job>/scores/<unit>.parquet,
then its record, which names the metrics computed (a unit missing a metric added since is redone); `after`
gathers every row into scores.parquet. Sample i of seed s starts from `noise_for(noise_seeds(s, n)[i])` and
asks for prompt i mod P of the evaluation prompt set (pipeline/prompt_sets.py: evaluate.prompts, else the
generate prompts), for every checkpoint alike, so students, teacher and the image grids share noise and prompts.
With `follow=True` (`flowsteer evaluate --follow`, pipeline/follow.py) the second job is follow/: every training
checkpoint a segment record vouches for, scored as training writes it; `after` turns its rows into curves.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.export import export_dir, is_export, write_card_scores
from pipeline.files import atomic_write_parquet
from pipeline import scores
from pipeline.metrics import metrics_for
from pipeline.metrics.base import EvalContext, Samples
from pipeline.runner import Job, Unit, drop_record, is_done, read_record
from pipeline.teacher_outputs import load_outputs, outputs_path, save_outputs
from schemas.config import RunConfig

NOISE_SEED_OFFSET = 1 << 40     # evaluation noise never coincides with the training trajectories' seeds
GRID_IMAGES = 20                # images kept per (checkpoint, schedule, nfe) for the report's grids


# ---------------------------------------------------------------- what is evaluated
def noise_seeds(seed: int, n: int) -> np.ndarray:
    """Per-sample noise seeds of evaluation seed `seed`: disjoint sets for different seeds, and above 2^32,
    so never one of the training trajectories' seeds (pipeline.seeds.sample_seeds are uint32)."""
    return NOISE_SEED_OFFSET + seed * (1 << 24) + np.arange(n, dtype=np.int64)


def student_checkpoints(cfg: RunConfig, methods=None) -> list[dict]:
    """Each training run's exported student (run names x train.seeds); a UserError names what to train."""
    out = []
    for run in cfg.train_runs(list(methods) if methods else None):
        train_dir = cfg.train_dir(run)
        if not is_done(train_dir, "export"):
            raise UserError(f"no exported student for run '{run.label}' in {train_dir}: "
                            f"run `flowsteer train -m {run.name}` first")
        out.append({"checkpoint": run.label, "run": run.name, "train_seed": run.seed, "dir": train_dir.name,
                    "fingerprint": cfg.fingerprint("train", run), "export": str(export_dir(cfg, run))})
    return out


def check(cfg: RunConfig) -> None:
    """Problems a user can fix, found at load before any model is loaded (one line each; pipeline/preflight.py)."""
    ev = cfg.evaluate
    for metric in metrics_for(cfg):
        metric.check(cfg)
    if any(n < 1 for n in ev.nfes) or ev.teacher_nfe < 1 or ev.n_samples < 2:
        raise UserError("evaluate.nfes and teacher_nfe must be >= 1 and n_samples >= 2")


def checkpoint_units(cfg: RunConfig, methods=None) -> list[dict]:
    """Every training checkpoint vouched for by a segment record so far, per run (pipeline/follow.py)."""
    from pipeline.follow import vouched_checkpoints

    return [{"checkpoint": f"{run.label}@{step}", "run": run.name, "train_seed": run.seed,
             "dir": f"{cfg.train_dir(run).name}_step{step:06d}", "fingerprint": cfg.fingerprint("train", run),
             "ckpt": str(path), "step": step}
            for run in cfg.train_runs(list(methods) if methods else None)
            for step, path in vouched_checkpoints(cfg.train_dir(run))]


def jobs(cfg: RunConfig, methods=None, follow: bool = False) -> list[Job]:
    """The teacher job (one unit per seed), then the students job (run x schedule x NFE x seed) or, with
    `follow`, the checkpoints job (run x vouched step x schedule x NFE x seed)."""
    from pipeline.prompt_sets import prompt_set

    check(cfg)
    ev, root = cfg.evaluate, cfg.stage_dir("evaluate")
    ps = prompt_set(cfg)
    make = functools.partial(EvalWorker, cfg.model_dump(mode="json"))
    n, tfp, prompts = ev.n_samples, cfg.fingerprint("teacher"), {"prompt_set": ps.name, "prompt_hash": ps.hash}
    teacher_units = [Unit(scores.teacher_unit_key(tfp, ev.teacher_nfe, s),
                          {"kind": "teacher", "checkpoint": "teacher", "run": "teacher", "train_seed": None,
                           "fingerprint": tfp, "schedule": "fixed", "nfe": ev.teacher_nfe, "seed": s, **prompts},
                          size=n) for s in ev.seeds]
    kind, found = (("checkpoint", checkpoint_units(cfg, methods)) if follow else
                   ("student", student_checkpoints(cfg, methods)))
    student_units = [Unit(scores.student_unit_key(c["dir"], sched, nfe, s),
                          {"kind": kind, **c, "schedule": sched, "nfe": nfe, "seed": s, **prompts}, size=n)
                     for c in found for sched in ev.schedules for nfe in ev.nfes for s in ev.seeds]
    names = [m.name for m in metrics_for(cfg)]
    common = dict(num_cpus=1, num_gpus=0 if cfg.device == "cpu" else 1, item_name="samples")
    teacher = Job("evaluate-teacher", root / "teacher", teacher_units, make, **common)
    students = Job("evaluate", root / ("follow" if follow else "students"), student_units, make, **common)
    teacher.prepare = functools.partial(_prepare, cfg, teacher, names, ps.hash)
    students.prepare = functools.partial(_prepare, None, students, names, ps.hash)
    return [teacher, students]


def _prepare(cfg: RunConfig | None, job: Job, names: list[str], prompt_hash: str) -> None:
    """Driver side, before the job: the metrics' one-off inputs (teacher job), and a redo of every unit whose
    record does not list exactly the metrics this run computes (a metric was added, removed or chosen) or
    was scored on another prompt set."""
    if cfg is not None:
        from pipeline.prompt_sets import write_copy

        for line in (w for metric in metrics_for(cfg) for w in metric.warnings(cfg)):
            print(f"warning: {line}", file=sys.stderr)
        write_copy(cfg)
        for metric in metrics_for(cfg):
            metric.prepare(cfg)
    for unit in job.units:
        rec = read_record(job.out_dir, unit.key)
        if rec and rec.get("status") == "done" and (rec.get("computed") != names
                                                     or rec.get("prompt_hash") != prompt_hash):
            drop_record(job.out_dir, unit.key)


def after(cfg: RunConfig, methods=None, follow: bool = False) -> str:
    """Gather every unit's rows (all checkpoints ever scored in this directory) into scores.parquet, then
    put each evaluated student's scores into its export's model card (the export owner's one write after
    training: pipeline/export.write_card_scores; docs/architecture.md). With `follow`: the checkpoints' rows
    into curves.parquet and TensorBoard (pipeline/curves.py)."""
    from pipeline.report_tables import checkpoint_scores

    root = cfg.stage_dir("evaluate")
    if follow:
        from pipeline.curves import curves_path, write_tensorboard

        curves = scores.gather(root, jobs=("follow",))
        atomic_write_parquet(curves_path(cfg), curves)
        tb = write_tensorboard(cfg, curves.to_pandas()) if curves.num_rows else None
        return f"evaluate --follow: {curves.num_rows} curve rows -> {curves_path(cfg)}" + (f", TensorBoard {tb}"
                                                                                            if tb else "")
    table = scores.gather(root)
    atomic_write_parquet(root / "scores.parquet", table)
    for run in cfg.train_runs(list(methods) if methods else None):
        export = export_dir(cfg, run)
        if is_export(export):
            write_card_scores(export, cfg, checkpoint_scores(cfg, run))
    return f"evaluate: {table.num_rows} score rows -> {root / 'scores.parquet'}"


def verify_unit(job: Job, unit: Unit) -> str | None:
    """A unit is sound when its score rows (and, for the teacher, its saved samples) read back."""
    import pyarrow.parquet as pq

    try:
        pq.read_table(Path(job.out_dir) / "scores" / f"{unit.key}.parquet")
        if unit.params["kind"] == "teacher":
            load_outputs(outputs_path(Path(job.out_dir).parent, unit.params["seed"]))
    except Exception as exc:  # any unreadable output means the unit must be redone
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- the worker
class EvalWorker:
    """Loads the teacher (prompt encoder, decoder), the metrics and each student once per process."""

    def __init__(self, cfg_json: dict):
        from pipeline.prompt_sets import eval_prompts
        from pipeline.teachers import load_teacher, resolve_device

        self.cfg = RunConfig.model_validate(cfg_json)
        self.device = resolve_device(self.cfg.device)
        self.teacher = load_teacher(self.cfg, self.device)
        self.prompts = eval_prompts(self.cfg)
        self.root = self.cfg.stage_dir("evaluate")
        self.ctx = EvalContext(self.cfg, self.device, self.teacher, self.root)
        self.metrics = [m(self.ctx) for m in metrics_for(self.cfg)]
        self.students: dict[str, object] = {}

    def prompts_at(self, index: torch.Tensor) -> list[str]:
        """The prompt of each sample (a TextColumn reads only the row groups holding them)."""
        rows = [int(i) for i in index]
        return self.prompts.take(rows) if hasattr(self.prompts, "take") else [self.prompts[i] for i in rows]

    def _student(self, p: dict):
        """The unit's student: an export, or (follow) a training checkpoint's EMA weights."""
        where = p.get("ckpt") or p["export"]
        if where not in self.students:
            self.students.clear()          # units are checkpoint-major: keep one student in memory
            if p["kind"] == "checkpoint":
                from pipeline.follow import checkpoint_student

                run = next(r for r in self.cfg.train_runs([p["run"]]) if r.seed == p["train_seed"])
                self.students[where] = checkpoint_student(self.cfg, run, self.teacher, Path(where), self.device)
            else:
                from pipeline.student import load_student

                self.students[where] = load_student(Path(where), self.device,   # LoRA: a byo teacher's base
                                                    base=getattr(self.teacher, "transformer", None))
        return self.students[where]

    def sigmas(self, p: dict) -> torch.Tensor | None:
        """The unit's grid: the teacher's fixed grid, a student's own (None), or diffusers' default grid read
        from FlowMatchEulerDiscreteScheduler configured like the export's scheduler."""
        from pipeline.schedule import fixed_sigmas

        if p["kind"] == "teacher":
            return fixed_sigmas(p["nfe"], self.cfg.schedule.shift)
        if p["schedule"] == "fixed":
            return None
        from diffusers import FlowMatchEulerDiscreteScheduler

        from pipeline.diffusers_scheduler import diffusers_sigmas

        saved = Path(p["export"]) / "scheduler" if p.get("export") else None
        config = FlowMatchEulerDiscreteScheduler.load_config(str(saved)) if saved and saved.is_dir() else None
        return diffusers_sigmas(p["nfe"], config, self.cfg.schedule.shift)

    @torch.no_grad()
    def generate(self, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """(samples in ODE space, images in [0, 1], prompt index, noise seeds) for one unit."""
        from pipeline.images import sample_images, student_sampler, teacher_sampler
        from pipeline.seeds import noise_for

        ev, n = self.cfg.evaluate, self.cfg.evaluate.n_samples
        seeds = noise_seeds(p["seed"], n)
        prompt_index = torch.arange(n) % len(self.prompts)
        shape = tuple(self.teacher.sample_shape)
        sigmas = self.sigmas(p)
        if p["kind"] == "teacher":
            sampler = teacher_sampler(self.teacher, sigmas, ev.guidance)
        else:
            student = self._student(p)
            inner = student_sampler(student.method, student.module, p["nfe"], student.meta["windows"],
                                    student.meta["shift"], sigmas)
            # students sample in the teacher's precision on GPUs (their weights stay float32: docs/precision.md)
            low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.cfg.teacher.dtype)
            on = low is not None and self.device.type == "cuda"

            def sampler(noise, cond):
                with torch.autocast(self.device.type, dtype=low, enabled=on):
                    return inner(noise, cond)
        x, images = sample_images(self.teacher, sampler, lambda i, j: noise_for(seeds[i:j].tolist(), shape), n,
                                  self.device, ev.batch_size, prompts=self.prompts_at(prompt_index))
        return x, images, prompt_index, seeds

    def run(self, unit: Unit) -> dict:
        p, ev = unit.params, self.cfg.evaluate
        job_dir = self.root / {"teacher": "teacher", "student": "students", "checkpoint": "follow"}[p["kind"]]
        t0 = time.time()
        try:
            x, images, prompt_index, seeds = self.generate(p)
        except FileNotFoundError:
            if p["kind"] != "checkpoint" or Path(p["ckpt"]).exists():
                raise
            # training removed this checkpoint (it keeps its newest few) after the unit was planned
            return {"skipped": "checkpoint removed by training before it was scored", "computed": [],
                    "prompt_hash": p.get("prompt_hash")}
        t_sample = time.time() - t0
        if p["kind"] == "teacher":
            save_outputs(outputs_path(self.root, p["seed"]), x, prompt_index, seeds)
        t1 = time.time()
        samples = Samples(p["kind"], p["seed"], x, images, self.prompts_at(prompt_index), seeds,
                          unit.key)
        values = {}
        for metric in self.metrics:
            v = metric.score(samples)
            if v is not None:
                values[metric.name] = float(v)
        t_score = time.time() - t1
        if p["seed"] == ev.seeds[0]:
            from pipeline.images import write_grid

            write_grid(images[:GRID_IMAGES], self.root / "grids" / f"{unit.key}.png", nrow=min(len(self.prompts), 10),
                       keep_pixels=True)
        rows = scores.unit_rows(self.cfg, p, values, n=len(images), sampling_seconds=t_sample,
                                scoring_seconds=t_score, unit=unit.key)
        scores.write_rows(job_dir / "scores" / f"{unit.key}.parquet", rows)
        return {"metrics": {m: round(v, 5) for m, v in values.items()}, "computed": [m.name for m in self.metrics],
                "n": len(images), "sampling_seconds": round(t_sample, 3), "scoring_seconds": round(t_score, 3),
                "prompt_hash": p.get("prompt_hash")}
