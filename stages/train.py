"""Train stage: one sequential job per training run (run name x seed); units are segments, then the export.

A run is a method with its options and one seed (schemas.config.TrainRun: `train.methods` names runs, each
a method or a `train.variants` entry, times `train.seeds`); every run reads the same trajectory store.
Units of `cfg.train_dir(run)` = `<root>/train/<name>-s<seed>-<fp>/`: `steps-000100`, `steps-000200`, ... (each trains up to its step
boundary and commits ONE checkpoint file before its record), then `export` (the EMA student as a diffusers
dir in `export/`). Every start resumes from the latest committed checkpoint, so a killed run loses at most
the steps since it. Losses go to `losses.jsonl` and, with `train.tensorboard`, to TensorBoard in `tb/`
(plus a 1/4-NFE sample grid at each checkpoint). With `train.workers > 1` a segment runs on Ray Train's
TorchTrainer (N ranks, gradients averaged, gloo on CPU); otherwise in the unit's own process.

The teacher is loaded once per process and shared by every method's jobs of one invocation
(`SharedTeacher`); run locally, each method shows its own per-step progress bar.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.runner import Job, Unit

LOSSES = "losses.jsonl"


# every job is one training run (run name x seed) reading the same store: `--share` may run them in any order
INDEPENDENT_JOBS = True


def training_store_path(cfg) -> Path:
    """The trajectory store: this run's generate output, or `train.store` (another run's store or its dir)."""
    return Path(cfg.train.store) if cfg.train.store else cfg.stage_dir("generate")


# What a store must share with the training config: the teacher and the grid its states lie on. The
# prompts, sample count and guidance range may differ (training from a bigger or other prompt set is fine).
MUST_MATCH = ("format", "teacher", "schedule")


def open_store(cfg):
    """Open the store and check it against this config's teacher and grid (a mismatch is a UserError)."""
    from pipeline.rowstore import meta_differences, mismatch_summary
    from pipeline.store import TrajectoryStore, store_meta

    store = TrajectoryStore.open(training_store_path(cfg))
    expected = store_meta(cfg)
    diff = meta_differences({k: store.meta.get(k) for k in MUST_MATCH}, {k: expected[k] for k in MUST_MATCH})
    if diff:
        raise UserError(f"trajectory store {store.path} was made for another teacher or grid "
                        f"({mismatch_summary(diff)}); set train.store to a matching store or run `flowsteer generate`")
    return store


class SharedTeacher:
    """The teacher, loaded on first use and kept for every method trained by this invocation in this process.
    Pickled (to a Ray actor) it travels without the network, and the actor loads its own once."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._loaded: dict[str, Any] = {}        # device -> teacher

    def get(self, device):
        from pipeline.teachers import load_teacher

        key = str(device)
        if key not in self._loaded:
            self._loaded[key] = load_teacher(self.cfg, device)
        return self._loaded[key]

    def __getstate__(self):
        return {"cfg": self.cfg, "_loaded": {}}


def build_trainer(cfg, run, out_dir: Path, device=None, rank: int = 0, world: int = 1,
                  teacher: SharedTeacher | None = None):
    """A Trainer at the latest committed checkpoint of `out_dir` (or at step 0), logging to TensorBoard on rank 0
    when `train.tensorboard` is on."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.teachers import resolve_device
    from pipeline.trainer import Trainer

    dev = resolve_device(str(device or cfg.device))
    trainer = Trainer(cfg, run, (teacher or SharedTeacher(cfg)).get(dev), open_store(cfg), dev, rank, world,
                      log_path=Path(out_dir) / LOSSES)
    state = load_checkpoint(out_dir)
    if state is not None:
        trainer.load_state_dict(state)
    else:
        trainer.trim_log()
    if rank == 0 and cfg.train.tensorboard:
        from pipeline.tensorboard import TensorBoardLogger, tb_dir

        trainer.tensorboard = TensorBoardLogger(tb_dir(out_dir), resume_step=trainer.step)
    return trainer


def train_segment(trainer, out_dir: Path, until: int) -> dict[str, Any]:
    """Train to `until` steps and commit the checkpoint (never one with non-finite weights)."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.trainer import NonFiniteLoss

    last = trainer.train_until(until)
    if not trainer.weights_finite():
        raise NonFiniteLoss(f"{trainer.method_name} step {trainer.step}: weights are not finite; not committed, "
                            f"the last good checkpoint is kept")
    state = trainer.state_dict()          # collective under several ranks: every rank calls it
    if trainer.rank == 0:
        save_checkpoint(out_dir, trainer.step, state)
        # FSDP: the EMA copy is gathered by all ranks together, so rank 0 alone cannot sample it (no grids)
        if trainer.tensorboard is not None and not trainer.fsdp:
            from pipeline.tensorboard import sample_grid

            sample_grid(trainer.tensorboard, trainer, trainer.step)
    return {"step": trainer.step, **{k: round(v, 6) for k, v in last.items()}}


class TrainWorker:
    """Runs one training run's units in order, keeping the trainer in memory between consecutive segments."""

    def __init__(self, cfg, run, out_dir: str, teacher: SharedTeacher | None = None, progress: bool = True):
        self.cfg, self.train_run, self.out_dir = cfg, run, Path(out_dir)
        self.teacher = teacher or SharedTeacher(cfg)
        self.progress = progress
        self.trainer = None
        self.bar = None

    def _trainer(self):
        from pipeline.checkpoint import latest_step

        # Reload unless the in-memory state is exactly the committed one (e.g. after a failed segment).
        if (self.trainer is None or self.trainer.step != latest_step(self.out_dir)
                or not self.trainer.holds_student()):      # a LoRA student whose adapters another run replaced
            self._drop_trainer()
            self.trainer = build_trainer(self.cfg, self.train_run, self.out_dir, teacher=self.teacher)
            self.trainer.on_step = self._on_step if self.progress else None
        return self.trainer

    def _drop_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.close()          # its prefetch thread
            if self.trainer.tensorboard is not None:
                self.trainer.tensorboard.close()
        self.trainer = None

    def _on_step(self, step: int, values: dict[str, float]) -> None:
        """One bar per method, moved every step, with the last loss (tqdm adds s/step)."""
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.cfg.train.steps, initial=step - 1, desc=f"train {self.train_run.label}",
                            unit="step", dynamic_ncols=True)
        self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", refresh=False)
        self.bar.update(1)
        if step >= self.cfg.train.steps:
            self.bar.close()

    def run(self, unit: Unit) -> dict[str, Any]:
        if unit.params["kind"] == "export":
            return self._export()
        until = unit.params["until"]
        if self.cfg.train.workers > 1:
            return train_distributed(self.cfg, self.train_run, self.out_dir, until)
        trainer = self._trainer()
        if trainer.step >= until:         # committed earlier, its record was lost
            return {"step": trainer.step}
        try:
            return train_segment(trainer, self.out_dir, until)
        except BaseException:
            self._drop_trainer()          # uncommitted steps: the next unit reloads the checkpoint
            if self.bar is not None:      # end the bar's line: the error message gets a line of its own
                self.bar.close()
                self.bar = None
            raise

    def _export(self) -> dict[str, Any]:
        from pipeline.export import EMA_DISTANCE, EXPORT_DIR, export_student
        from pipeline.lora import footprint
        from pipeline.lora_export import ema_adapter, student_meta

        trainer = self._trainer()
        if trainer.step < self.cfg.train.steps:
            raise RuntimeError(f"export needs step {self.cfg.train.steps}, the latest checkpoint is {trainer.step}")
        # how far the exported average has left the teacher, relative to the raw weights (docs/ablation.md)
        extra = {EMA_DISTANCE: round(trainer.ema.relative_distance(trainer.student), 6), "step": trainer.step,
                 **trainer.method.export_meta(),
                 **footprint(trainer.student, trainer.param_names, trainer.opt),    # trainable params, AdamW bytes
                 "student": student_meta(self.cfg, merged=trainer.lora)}
        # a LoRA student of a drop-in method exports its adapter (a diffusers LoRA dir), else the full network
        network = ema_adapter(trainer) if trainer.lora and trainer.method.drop_in else trainer.ema_student()
        path = export_student(self.out_dir / EXPORT_DIR, self.train_run, network, self.cfg,
                              trainer.rows.sample_shape, extra)
        self._drop_trainer()              # the run is finished: free its student and close its event file
        return {"export": str(path), "step": trainer.step, EMA_DISTANCE: extra[EMA_DISTANCE]}


# ---------------------------------------------------------------- Ray Train (train.workers > 1)
def _ray_train_loop(config: dict) -> None:
    """Each Ray Train worker: rank-derived seeds, its own share of every batch, averaged gradients."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, out_dir = config["cfg"], Path(config["out_dir"])
    device = cfg.device if not cfg.device.startswith("cuda") else f"cuda:{ctx.get_local_rank()}"
    trainer = build_trainer(cfg, config["run"], out_dir, device, rank, world)
    try:
        if trainer.step < config["until"]:
            train_segment(trainer, out_dir, config["until"])
    finally:
        trainer.close()


def train_distributed(cfg, run, out_dir: Path, until: int) -> dict[str, Any]:
    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.checkpoint import latest_step
    from pipeline.runner import _ray_init

    _ray_init(None)
    gpu = cfg.device.startswith("cuda")
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config={"cfg": cfg, "run": run, "out_dir": str(out_dir), "until": until},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RayRunConfig(name=f"steps-{until:06d}", storage_path=str(Path(out_dir).resolve() / "ray")))
    trainer.fit()
    step = latest_step(out_dir)
    if step < until:
        raise RuntimeError(f"Ray Train finished but the latest checkpoint is step {step}, not {until}")
    return {"step": step, "workers": cfg.train.workers}


# ---------------------------------------------------------------- the stage
def segment_boundaries(steps: int, every: int) -> list[int]:
    every = max(1, min(every, steps))
    return sorted({*range(every, steps + 1, every), steps})


def prepare(cfg, out_dir: Path, units: list[Unit]) -> None:
    """Driver side, under the stage lock: the store matches, and when units are pending, training resumes
    from the newest checkpoint that loads (a bad newest one: a warning and the previous kept one; the
    records of the segments it held are dropped so they are trained again)."""
    import sys

    from pipeline.checkpoint import settle
    from pipeline.runner import drop_record, is_done

    open_store(cfg)
    if all(is_done(out_dir, u.key) for u in units):
        return
    step = settle(out_dir, warn=lambda msg: print(msg, file=sys.stderr))
    for u in units:
        if is_done(out_dir, u.key) and (u.params.get("until", cfg.train.steps + 1) > step):
            drop_record(out_dir, u.key)


def runs(cfg, methods=None):
    """The TrainRuns named by `methods` (default train.methods) x train.seeds; an unknown name is a UserError."""
    from pipeline.methods import get_method, method_names

    names = list(methods or cfg.train.methods)
    for name in names:
        method = cfg.train.variants[name].method if name in cfg.train.variants else name
        try:
            get_method(method)
        except KeyError:
            where = f"train.variants.{name}.method" if name in cfg.train.variants else "run name"
            raise UserError(f"{where} '{method}' is neither a method ({', '.join(method_names())}) nor a "
                            f"train.variants entry ({', '.join(sorted(cfg.train.variants)) or 'none defined'})") from None
    out = cfg.train_runs(names)
    for run in out[::len(cfg.train.seeds)]:          # options are checked once per run name
        get_method(run.method).check_config(cfg, run.options)
    check_disc_blocks(cfg, [r for r in out[::len(cfg.train.seeds)] if get_method(r.method).uses_adversarial])
    return out


def check_disc_blocks(cfg, runs) -> None:
    """An explicit disc_blocks (train.adversarial or a run's option) deeper than the teacher is one UserError
    before any work; null means min(2, depth) and needs no check. The depth comes from the teacher's config,
    or a byo teacher built once on the CPU (pipeline.teachers.teacher_depth)."""
    from pipeline.teachers import teacher_depth

    asked = {r.name: r.options.get("disc_blocks") or cfg.train.adversarial.disc_blocks for r in runs}
    asked = {name: b for name, b in asked.items() if b is not None}
    if not asked:
        return
    depth = teacher_depth(cfg, build=True)
    for name, blocks in asked.items():
        if depth is not None and blocks > depth:
            raise UserError(f"train.adversarial.disc_blocks is {blocks} (run '{name}') but the teacher transformer "
                            f"has {depth} blocks (use 1..{depth}, or null for min(2, depth))")


def check(cfg) -> None:
    """At load (pipeline/preflight.py): every run's method accepts the config (options, adversarial settings)."""
    runs(cfg)


def jobs(cfg, methods=None) -> list[Job]:
    from pipeline.plan import check_fits

    out = []
    teacher = SharedTeacher(cfg)          # one teacher load for every run of this invocation (per process)
    planned = runs(cfg, methods)
    check_fits(cfg, sorted({r.method for r in planned}))    # a run that cannot fit: one line, nothing loaded
    for run in planned:
        out_dir = cfg.train_dir(run)
        bounds = segment_boundaries(cfg.train.steps, cfg.train.checkpoint_every)
        units = [Unit(f"steps-{b:06d}", {"kind": "segment", "until": b}, size=b - a)
                 for a, b in zip([0, *bounds], bounds)]
        units.append(Unit("export", {"kind": "export"}, size=1))
        distributed = cfg.train.workers > 1
        out.append(Job(stage="train", out_dir=out_dir, units=units,
                       make_worker=functools.partial(TrainWorker, cfg, run, str(out_dir), teacher),
                       prepare=functools.partial(prepare, cfg, out_dir, units), sequential=True, item_name="steps",
                       own_progress=not distributed,
                       # the Ray Train workers hold the CPUs; the unit's actor only orchestrates them
                       num_cpus=0 if distributed else 1,
                       num_gpus=0 if distributed else (1 if cfg.device.startswith("cuda") else 0)))
    return out


def verify_unit(job: Job, unit: Unit) -> str | None:
    """A finished segment must still have a loadable checkpoint at or past its step; the export its files."""
    from pipeline.checkpoint import latest_step
    from pipeline.runner import is_done

    if not is_done(job.out_dir, unit.key):
        return None
    if unit.params["kind"] == "export":
        from pipeline.export import EXPORT_DIR, missing_parts

        missing = missing_parts(job.out_dir / EXPORT_DIR)
        return f"export is missing {', '.join(missing)}" if missing else None
    step = latest_step(job.out_dir)
    if step < unit.params["until"]:
        return f"no committed checkpoint at step {unit.params['until']}"
    if step == unit.params["until"]:              # the newest checkpoint must load (tensors mmapped: cheap)
        from pipeline.checkpoint import candidates, check_file

        newest = candidates(job.out_dir)[0]
        problem = check_file(newest)
        if problem:
            return f"checkpoint {newest} cannot be loaded ({problem}); the previous kept one will be used"
    return None


def after(cfg, methods=None) -> str | None:
    """Where each run's export and loss log are, with its last logged loss."""
    import json

    lines = []
    for run in runs(cfg, methods):
        out_dir = cfg.train_dir(run)
        log = out_dir / LOSSES
        rows = log.read_text().splitlines() if log.exists() else []
        last = json.loads(rows[-1]) if rows else {}
        loss = f", loss {last['loss']:.4g} at step {last['step']}" if "loss" in last else ""
        lines.append(f"train: {run.label}: export {out_dir / 'export'}{loss}")
    if lines and cfg.train.tensorboard:
        lines.append(f"train: curves and sample grids: tensorboard --logdir {Path(cfg.root) / 'train'}")
    return "\n".join(lines) or None
