"""The distillation loop (EDM2 style): the trainer owns optimisers, EMA, seeds, logging and checkpoint state;
a registered Method (pipeline/methods) owns the batch and the losses.

Per step: batch = method.complete(the step's rows from the loader); if the method has a discriminator, one D
step (own AdamW, disc_lr) on `discriminator_losses`; then one G step (AdamW, weight decay, grad clip) on
`generator_losses`; `after_step`; EMA of the student. Every non-finite loss stops the run before any weight changes.

Precision (docs/precision.md): the student and discriminator are float32 master weights whatever the
teacher's dtype; with `train.mixed_precision` their losses run under torch.autocast (bf16, or fp16 with a
GradScaler per optimiser); EMA and export stay float32. A step's rows come from the batch loader (pipeline/
loader.py: `train.loader_workers` processes, or a thread `train.prefetch` ahead), drawn from the step's own
batch_rng; the method completes them with the teacher solves they need, and its own draws use step_rng.
Compilation, fused AdamW, checkpointing and TF32: pipeline/fast_step.py.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import all_finite, derive_seed, rng_state, set_rng_state
from pipeline.data import RowSource
from pipeline.errors import UserError
from pipeline.fast_step import adamw, prepare_student
from pipeline.loader import BatchLoader
from pipeline.lora import frozen
from pipeline.loss_log import LossLog
from pipeline.methods import get_method
from pipeline.methods.base import MethodContext
from pipeline.sharding import (all_ranks, average_gradients, distribute_student, full_optimizer_state, gather_full,
                               local, shard_like, shard_optimizer_state, sum_over_ranks)
from pipeline.teacher_solves import TeacherSolves

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(UserError):
    """A loss or gradient became NaN/inf: training stops and the last good checkpoint stays."""


def ema_beta(step: int, decay: float, warmup: str, images_per_step: int = 1, rampup: float = 0.05) -> float:
    """The EMA's decay for update number `step` (0-based): how much of the old average it keeps.

    none:  `decay` from the first step (at 0.99 over 150 steps, 22% of the average stays at the init).
    power: min(decay, (1 + t) / (10 + t)) (the warm-up of the original EMA-for-GANs recipes).
    edm:   EDM (Karras et al. 2022, training/training_loop.py): a half-life in images that ramps up with
           the images seen, h_t = min(h, rampup * images seen after this step), h = the half-life of `decay`
           (images_per_step * ln 0.5 / ln decay); beta_t = 0.5 ** (images_per_step / h_t). See docs/ablation.md."""
    if warmup == "none":
        return decay
    if warmup == "power":
        return min(decay, (1 + step) / (10 + step))
    if warmup == "edm":
        halflife = images_per_step * math.log(0.5) / math.log(decay) if 0 < decay < 1 else float("inf")
        ramped = min(halflife, rampup * images_per_step * (step + 1))
        return 0.5 ** (images_per_step / max(ramped, 1e-8))
    raise ValueError(f"unknown EMA warm-up '{warmup}' (use none, power or edm)")


class EMA:
    """Exponential moving average of the trainable parameters (with LoRA: of the adapters only), with a
    warm-up (`ema_beta`) so that the exported average leaves the initial weights as the raw ones do.

    `origin` keeps the initial values (on the CPU) to report how far the average has moved from them
    relative to the raw weights (`relative_distance`)."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: str = "none", images_per_step: int = 1,
                 rampup: float = 0.05):
        self.decay, self.warmup, self.images_per_step, self.rampup = decay, warmup, images_per_step, rampup
        ema_beta(0, decay, warmup, images_per_step, rampup)          # an unknown warm-up fails here
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.origin = {n: local(p).detach().to("cpu", copy=True) for n, p in self.shadow.items()}
        self.world = 1                         # > 1 when the shadow is sharded (its sums add over ranks)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> float:
        """Move the average towards `module`'s weights after optimisation step `step` (0-based); returns beta."""
        beta = ema_beta(step, self.decay, self.warmup, self.images_per_step, self.rampup)
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - beta)
        return beta

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(gather_full({n: self.shadow[n]})[n])

    @torch.no_grad()
    def relative_distance(self, module: torch.nn.Module) -> float:
        """||EMA - init|| / ||raw - init|| over all averaged parameters: 1 = the average moved as far from
        the initial (teacher) weights as the raw student, 0 = it is still the teacher. NaN before any move."""
        ema_sq = raw_sq = 0.0
        for n, p in module.named_parameters():
            if n in self.shadow:
                origin = self.origin[n].to(p.device).float()
                ema_sq += float((local(self.shadow[n]).float() - origin).pow(2).sum())
                raw_sq += float((local(p.detach()).float() - origin).pow(2).sum())
        ema_sq, raw_sq = sum_over_ranks([ema_sq, raw_sq], self.world)
        return math.sqrt(ema_sq / raw_sq) if raw_sq > 0 else float("nan")


class Trainer:
    """One method's training state on one rank; `world > 1`: DDP or FSDP2 (train.sharding) over the process group."""

    def __init__(self, cfg, run, teacher, store, device, rank: int = 0, world: int = 1,
                 log_path: Path | None = None):
        """`run`: a schemas.config.TrainRun (method, options, seed) or a run name (its first seed)."""
        self.run = cfg.train_run(run) if isinstance(run, str) else run
        self.method_name, self.rank, self.world = self.run.method, rank, world
        seed = self.run.seed
        self.device = torch.device(device)
        tc = cfg.train
        if tc.batch_size % world:
            raise UserError(f"train.batch_size ({tc.batch_size}) must be a multiple of train.workers ({world})")
        # A method draws cfg.train.batch_size rows; with N workers each rank draws its own 1/N share.
        self.cfg = cfg if world == 1 else cfg.model_copy(
            update={"train": tc.model_copy(update={"batch_size": tc.batch_size // world})})
        if not hasattr(teacher, "transformer"):
            raise UserError("training needs a teacher with a `.transformer` (the student starts as its copy)")
        # LoRA (train.student, pipeline/lora.py): the student is the teacher's transformer plus adapters, so the
        # teacher is called through a wrapper that turns them off
        self.lora = tc.student.kind == "lora"
        if self.lora:
            from pipeline.lora import SharedBaseTeacher

            teacher = SharedBaseTeacher(teacher)
        self.teacher = teacher
        # Two streams: each step's rows come from its own batch_rng (seeded from (seed, rank, step) in
        # pipeline/data.py), so loader workers draw them in any process; the step's own draws use step_rng.
        step_rng = torch.Generator().manual_seed(derive_seed(seed, "method", rank))
        self.rows = RowSource(self.cfg, store, teacher.sample_shape, seed, rank, world,
                              shared_seed=derive_seed(seed, "method", 0))
        self.solves = TeacherSolves(teacher, store, self.device, self.rows.windows, self.cfg)
        ctx = MethodContext(cfg=self.cfg, teacher=teacher, rows=self.rows, solves=self.solves,
                            edges=self.solves.edges, device=self.device, step_rng=step_rng,
                            options=dict(self.run.options))
        # Same initial weights on every rank (LoRA and discriminator heads are random-init).
        torch.manual_seed(derive_seed(seed, "init"))
        self.method = get_method(self.method_name)(ctx)
        # float32 master weights even for a bf16/fp16 teacher (pure low-precision AdamW loses small updates);
        # with LoRA float32 adapters on the teacher's own (frozen) weights
        from pipeline.lora import build_student, trainable_names

        self.student = build_student(self.method, teacher, tc.student, self.device, owner=self)
        self.param_names = trainable_names(self.student)
        prepare_student(self.student, tc, self.device)   # gradient checkpointing, compile, TF32
        self.fsdp = distribute_student(self.student, world, tc)   # DDP or FSDP2 over the ranks (pipeline/sharding.py)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = adamw(self.params, tc.lr, tc.weight_decay, self.device)
        self.disc = self.method.discriminator()
        if self.disc is not None:
            self.disc.float().to(self.device)     # in place: the method holds the same module
        self.disc_params = [p for p in self.disc.parameters() if p.requires_grad] if self.disc is not None else []
        self.disc_opt = (adamw(self.disc_params, tc.adversarial.disc_lr, tc.weight_decay, self.device)
                         if self.disc is not None else None)
        self.ema = EMA(self.student, tc.ema_decay, tc.ema_warmup, tc.batch_size, tc.ema_rampup)
        self.ema.world = world if self.fsdp else 1
        self.autocast_dtype = AUTOCAST_DTYPES.get(tc.mixed_precision)
        fp16 = tc.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.loader = BatchLoader(self._draw, self.device, tc.loader_workers, tc.prefetch, last_step=tc.steps)
        self.step = 0
        self.loss_log = LossLog(log_path if rank == 0 else None)
        self.on_step = None               # on_step(step, values) after every step (the train stage's progress bar)

    @property
    def tensorboard(self):
        """A pipeline.tensorboard.TensorBoardLogger, set by the train stage on rank 0 (rows go to it too)."""
        return self.loss_log.tensorboard

    @tensorboard.setter
    def tensorboard(self, logger) -> None:
        self.loss_log.tensorboard = logger

    # ------------------------------------------------------------ state
    def _draw(self, step: int) -> dict:
        """Step's rows (runs in a loader worker): a pure function of (seed, rank, step, real-data cursor)."""
        return self.method.draw(step, self.rows.at(step))

    def close(self) -> None:
        """Stop the loader's workers or thread (rows drawn ahead are dropped); a LoRA student's adapters leave
        the shared teacher, which is then exactly the teacher again."""
        self.loader.close()
        if self.lora:
            from pipeline.lora import detach_adapters

            detach_adapters(self.teacher.transformer, self)

    def state_dict(self) -> dict[str, Any]:
        """Shared weights and optimisers, plus each rank's own streams (collective when world > 1)."""
        own = {"method": self.method.state_dict(), "step_rng": self.method.ctx.step_rng.get_state(),
               "rows": self.rows.state_dict(self.step), "rng": rng_state()}
        ranks = [own]
        if self.world > 1:
            import torch.distributed as dist

            ranks = [None] * self.world
            dist.all_gather_object(ranks, own)
        return {"method_name": self.method_name, "world": self.world, "student": self.student_state(),
                "ema": gather_full(self.ema.shadow), "opt": full_optimizer_state(self.opt),
                "disc": self.disc.state_dict() if self.disc is not None else None,
                "disc_opt": self.disc_opt.state_dict() if self.disc_opt is not None else None, "ranks": ranks,
                "scalers": [self.scaler.state_dict(), self.disc_scaler.state_dict()]}

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's weights a checkpoint keeps: all of them, or with LoRA the trainable ones only."""
        from pipeline.lora import trainable_state

        return trainable_state(self.student, self.param_names) if self.lora else gather_full(self.student.state_dict())

    def base_lock(self):
        """Held for a whole step with LoRA: teacher calls turn the shared adapters off (pipeline/lora.py)."""
        from pipeline.lora import BASE_LOCK

        if not self.lora:
            return contextlib.nullcontext()
        if not self.holds_student():
            raise RuntimeError(f"{self.method_name}: another run's trainer replaced this LoRA student's adapters "
                               f"on the shared teacher; rebuild the trainer from its checkpoint")
        return BASE_LOCK

    def holds_student(self) -> bool:
        """False when another trainer on the same (shared) teacher replaced this LoRA student's adapters."""
        from pipeline.lora import owns

        return not self.lora or owns(self.teacher.transformer, self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.lora:
            from pipeline.lora import load_trainable_state

            load_trainable_state(self.student, state["student"], self.param_names)
        else:
            self.student.load_state_dict(shard_like(state["student"], self.student.state_dict()))
        self.ema.shadow = shard_like({n: t.to(self.device) for n, t in state["ema"].items()},
                                     dict(self.student.named_parameters()))
        self.opt.load_state_dict(shard_optimizer_state(state["opt"], self.params))
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        # A different worker count resumes with rank r's streams from rank r % old world (no longer exact).
        own = state["ranks"][self.rank % len(state["ranks"])]
        if "rows" not in own:
            raise UserError("this checkpoint was written before batches were drawn per step (its batch stream "
                            "cannot be continued exactly): retrain the run (move its train directory away)")
        self.step = int(state["step"])
        self.method.load_state_dict(own["method"])
        self.method.ctx.step_rng.set_state(own["step_rng"])
        self.rows.load_state_dict(own["rows"], self.step)
        self.loader.discard()                  # rows drawn ahead from the old cursor
        for scaler, saved in zip((self.scaler, self.disc_scaler), state.get("scalers") or ()):
            if saved:
                scaler.load_state_dict(saved)
        set_rng_state(own["rng"])
        self.trim_log()

    def weights_finite(self) -> bool:
        # FSDP: each rank checks its own shards, and all must agree (a rank alone must not skip a commit)
        student = self.student.state_dict().values() if self.fsdp else self.student_state().values()
        tensors = [*map(local, student), *map(local, self.ema.shadow.values())]
        if self.disc is not None:
            tensors += list(self.disc.state_dict().values())
        return all_ranks(all_finite(tensors), self.world if self.fsdp else 1)

    # ------------------------------------------------------------ one step
    def _check(self, losses: dict[str, torch.Tensor], step: int, prefix: str = "") -> dict[str, float]:
        values = {(k if k.startswith(prefix) else prefix + k): float(v.detach()) for k, v in losses.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"{self.method_name} step {step}: loss '{bad[0]}' is {values[bad[0]]}; training "
                                f"stopped, the last good checkpoint is kept (lower train.lr or check the data)")
        return values

    def _update(self, opt, scaler, params, loss: torch.Tensor, step: int, clip: float, name: str) -> float:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()            # a no-op scale unless fp16; DDP averages the student's
        if params is self.disc_params:           # gradients inside backward (pipeline/sharding.py)
            average_gradients(params, self.world)
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))  # FSDP: over all shards
        norm = gather_full({"n": norm})["n"]
        if not torch.isfinite(norm) and not scaler.is_enabled():
            raise NonFiniteLoss(f"{self.method_name} step {step}: gradient norm of '{name}' is {float(norm)}; "
                                f"training stopped, the last good checkpoint is kept")
        scaler.step(opt)                         # fp16: skipped on inf/nan gradients, and the scale lowered
        scaler.update()
        return float(norm)

    def autocast(self):
        """The student/discriminator forward region: torch.autocast at train.mixed_precision, else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the named loss values (D losses prefixed 'd_')."""
        step, tc = self.step + 1, self.cfg.train
        torch.manual_seed(derive_seed(self.run.seed, self.rank, step))   # global RNG (dropout etc.) per step
        rows = self.loader.next(self.step)
        with self.base_lock():
            with torch.no_grad():
                batch = self.method.complete(rows)
            return self._step(step, tc, batch)

    def _step(self, step: int, tc, batch) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.disc is not None:
            with self.autocast():
                d_losses = self.method.discriminator_losses(self.student, batch, self.step)
            if d_losses is not None:
                values.update(self._check(d_losses, step, "d_"))
                self._update(self.disc_opt, self.disc_scaler, self.disc_params, d_losses["loss"], step, 0.0,
                             "d_loss")
        with frozen(self.disc_params):
            with self.autocast():
                g_losses = self.method.generator_losses(self.student, batch, self.step)
            values.update(self._check(g_losses, step))
            values["grad_norm"] = self._update(self.opt, self.scaler, self.params, g_losses["loss"], step,
                                               tc.grad_clip, "loss")
        self.method.after_step(self.student, self.step)
        values["ema_beta"] = self.ema.update(self.student, self.step)
        self.step = step
        if self.world > 1:                    # log the mean over ranks
            import torch.distributed as dist

            keys = sorted(values)
            t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            values = dict(zip(keys, (t / self.world).tolist()))
        return values

    def train_until(self, boundary: int) -> dict[str, float]:
        """Steps until `boundary` steps are done; logs the means of every train.log_every steps (pipeline/
        loss_log.py) with the time per step spent waiting for the loader (`data_wait_s`), in the teacher solves
        of the batch (`teacher_data_s`) and in all (`step_s`); returns the last losses."""
        last: dict[str, float] = {}
        clock = lambda: (time.perf_counter(), self.loader.wait_seconds, self.solves.teacher_seconds)  # noqa: E731
        start, n = clock(), 0
        self.loss_log.means()                  # the means restart at every segment, as in an uninterrupted run
        while self.step < boundary:
            last = self.train_step()
            n += 1
            self.loss_log.add(last)
            if self.on_step is not None:
                self.on_step(self.step, last)
            if self.step % self.cfg.train.log_every == 0 or self.step == boundary:
                t, wait, teach = (now - then for now, then in zip(clock(), start))
                self.log({"step": self.step, **self.loss_log.means(), "lr": self.opt.param_groups[0]["lr"],
                          "ema_rel_distance": self.ema.relative_distance(self.student),
                          "data_wait_s": wait / n, "teacher_data_s": teach / n, "step_s": t / n})
                start, n = clock(), 0
        return last

    # ------------------------------------------------------------ logging and export
    def log(self, row: dict[str, Any]) -> None:
        self.loss_log.write(row)

    def trim_log(self) -> None:
        """After a resume: the log keeps the lines of the steps the checkpoint holds."""
        self.loss_log.trim(self.step)

    def ema_student(self) -> torch.nn.Module:
        """A copy of the student carrying the EMA weights, LoRA merged into the base weights."""
        if self.lora:
            from pipeline.lora import merged_copy

            return merged_copy(self.student, self.ema.shadow)
        # a fresh copy of the student's structure (DDP's replicated module refuses deepcopy), its weights loaded
        net = self.method.wrap_student(copy.deepcopy(self.teacher.transformer).float())
        net.load_state_dict(self.student_state())          # FSDP: gathered (every rank calls this)
        self.ema.copy_to(net)
        return net.eval().requires_grad_(False)

