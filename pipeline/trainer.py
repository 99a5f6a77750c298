"""The distillation loop (EDM2 style): the trainer owns optimisers, EMA, seeds, logging and checkpoint state;
a registered Method (pipeline/methods) owns the batch and the losses.

Per step: batch = method.batch(step); if the method has a discriminator, one D step (own AdamW, disc_lr) on
`discriminator_losses`; then one G step (AdamW, weight decay, grad clip) on `generator_losses`; `after_step`;
EMA of the student. Every non-finite loss stops the run before any weight changes.

Precision (docs/precision.md): the student and discriminator are float32 master weights whatever the
teacher's dtype; with `train.mixed_precision` their losses run under torch.autocast (bf16, or fp16 with a
GradScaler per optimiser); EMA and export stay float32. Batches come from a BatchPrefetcher (pipeline/
prefetch.py) that draws them with their own generator, `train.prefetch` steps ahead on a background thread.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.checkpoint import all_finite, rng_state, set_rng_state
from pipeline.data import DataSource
from pipeline.errors import UserError
from pipeline.methods import get_method
from pipeline.methods.base import MethodContext
from pipeline.prefetch import BatchPrefetcher
from pipeline.sharding import average_gradients, replicate_student

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(UserError):
    """A loss or gradient became NaN/inf: training stops and the last good checkpoint stays."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, e.g. (seed, rank, step): independent streams, reproducible on resume."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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
        self.origin = {n: p.detach().to("cpu", copy=True) for n, p in self.shadow.items()}

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
                p.copy_(self.shadow[n])

    @torch.no_grad()
    def relative_distance(self, module: torch.nn.Module) -> float:
        """||EMA - init|| / ||raw - init|| over all averaged parameters: 1 = the average moved as far from
        the initial (teacher) weights as the raw student, 0 = it is still the teacher. NaN before any move."""
        ema_sq = raw_sq = 0.0
        for n, p in module.named_parameters():
            if n in self.shadow:
                origin = self.origin[n].to(p.device)
                ema_sq += float((self.shadow[n].float() - origin.float()).pow(2).sum())
                raw_sq += float((p.detach().float() - origin.float()).pow(2).sum())
        return math.sqrt(ema_sq / raw_sq) if raw_sq > 0 else float("nan")


@contextmanager
def frozen(params: Iterable[torch.nn.Parameter]):
    """The generator step needs gradients THROUGH the discriminator, not OF it: its parameters record none
    inside (restored after). The trainer alone freezes the discriminator; a method never does."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class Trainer:
    """One method's training state on one rank; `world > 1`: DDP over the process group (pipeline/sharding.py)."""

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
        # Two streams: the batch stream (what a batch holds: DataSource and method.batch) and the method
        # generator (the step's own draws), so batches can be drawn ahead without changing either.
        generator = torch.Generator().manual_seed(derive_seed(seed, "method", rank))
        batch_generator = torch.Generator().manual_seed(derive_seed(seed, "batch", rank))
        self.data = DataSource(self.cfg, teacher, store, self.device, batch_generator, rank, world,
                               shared_seed=derive_seed(seed, "method", 0))
        ctx = MethodContext(cfg=self.cfg, teacher=teacher, data=self.data, edges=self.data.edges.to(self.device),
                            device=self.device, generator=generator, options=dict(self.run.options))
        # Same initial weights on every rank (LoRA and discriminator heads are random-init).
        torch.manual_seed(derive_seed(seed, "init"))
        self.method = get_method(self.method_name)(ctx)
        # float32 master weights even for a bf16/fp16 teacher (pure low-precision AdamW loses small updates);
        # with LoRA float32 adapters on the teacher's own (frozen) weights
        from pipeline.lora import build_student, trainable_names

        self.student = build_student(self.method, teacher, tc.student, self.device, owner=self)
        self.param_names = trainable_names(self.student)
        replicate_student(self.student, world)    # DDP over the ranks (pipeline/sharding.py)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.disc = self.method.discriminator()
        if self.disc is not None:
            self.disc.float().to(self.device)     # in place: the method holds the same module
        self.disc_params = [p for p in self.disc.parameters() if p.requires_grad] if self.disc is not None else []
        self.disc_opt = (torch.optim.AdamW(self.disc_params, lr=tc.adversarial.disc_lr, weight_decay=tc.weight_decay)
                         if self.disc is not None else None)
        self.ema = EMA(self.student, tc.ema_decay, tc.ema_warmup, tc.batch_size, tc.ema_rampup)
        self.autocast_dtype = AUTOCAST_DTYPES.get(tc.mixed_precision)
        fp16 = tc.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        # method.batch as the batch stream sees it: the same method, its context's generator = the batch stream
        batch_view = copy.copy(self.method)
        batch_view.ctx = dataclasses.replace(ctx, generator=batch_generator)
        self.batches = BatchPrefetcher(batch_view.batch, self._batch_state, self._set_batch_state, tc.prefetch,
                                       last_step=tc.steps, read_seconds=lambda: self.data.wait_seconds)
        self.step = 0
        self.log_path = Path(log_path) if log_path is not None and rank == 0 else None
        self.tensorboard = None           # a pipeline.tensorboard.TensorBoardLogger, set by the train stage on rank 0
        self.on_step = None               # on_step(step, values) after every step (the train stage's progress bar)

    # ------------------------------------------------------------ state
    def _batch_state(self) -> dict[str, Any]:
        return {"generator": self.data.generator.get_state(), "data": self.data.state_dict()}

    def _set_batch_state(self, state: dict[str, Any]) -> None:
        self.data.generator.set_state(state["generator"])
        self.data.load_state_dict(state["data"])

    def close(self) -> None:
        """Stop the prefetch thread (batches drawn ahead are dropped); a LoRA student's adapters leave the
        shared teacher, which is then exactly the teacher again."""
        self.batches.close()
        if self.lora:
            from pipeline.lora import detach_adapters

            detach_adapters(self.data.teacher.transformer, self)

    def state_dict(self) -> dict[str, Any]:
        """Shared weights and optimisers, plus each rank's own streams (collective when world > 1)."""
        own = {"method": self.method.state_dict(), "generator": self.method.ctx.generator.get_state(),
               "batches": self.batches.state_dict(), "rng": rng_state()}
        ranks = [own]
        if self.world > 1:
            import torch.distributed as dist

            ranks = [None] * self.world
            dist.all_gather_object(ranks, own)
        return {"method_name": self.method_name, "world": self.world, "student": self.student_state(),
                "ema": self.ema.shadow, "opt": self.opt.state_dict(),
                "disc": self.disc.state_dict() if self.disc is not None else None,
                "disc_opt": self.disc_opt.state_dict() if self.disc_opt is not None else None, "ranks": ranks,
                "scalers": [self.scaler.state_dict(), self.disc_scaler.state_dict()]}

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's weights a checkpoint keeps: all of them, or with LoRA the trainable ones only."""
        from pipeline.lora import trainable_state

        return trainable_state(self.student, self.param_names) if self.lora else self.student.state_dict()

    def base_lock(self):
        """Held for a whole step with LoRA: the prefetch thread's teacher calls turn the shared adapters off."""
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

        return not self.lora or owns(self.data.teacher.transformer, self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.lora:
            from pipeline.lora import load_trainable_state

            load_trainable_state(self.student, state["student"], self.param_names)
        else:
            self.student.load_state_dict(state["student"])
        self.ema.shadow = {n: t.to(self.device) for n, t in state["ema"].items()}
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        # A different worker count resumes with rank r's streams from rank r % old world (no longer exact).
        own = state["ranks"][self.rank % len(state["ranks"])]
        self.method.load_state_dict(own["method"])
        self.method.ctx.generator.set_state(own["generator"])
        self.batches.load_state_dict(own["batches"])
        for scaler, saved in zip((self.scaler, self.disc_scaler), state.get("scalers") or ()):
            if saved:
                scaler.load_state_dict(saved)
        set_rng_state(own["rng"])
        self.step = int(state["step"])
        self.trim_log()

    def weights_finite(self) -> bool:
        tensors = [*self.student_state().values(), *self.ema.shadow.values()]
        if self.disc is not None:
            tensors += list(self.disc.state_dict().values())
        return all_finite(tensors)

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
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
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
        batch = self.batches.next(self.step)
        with self.base_lock():
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
        """Steps until `boundary` steps are done; logs every train.log_every steps; returns the last losses.

        A logged loss is the mean over the steps since the previous line (one step's batch is too noisy to
        read, e.g. the discriminator's accuracy on a few rows); the means restart at every segment, so a
        resumed run logs exactly what an uninterrupted one does."""
        last: dict[str, float] = {}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t0, w0, s0, n = time.perf_counter(), self.batches.wait_seconds, self.data.teacher_seconds, 0
        while self.step < boundary:
            last = self.train_step()
            n += 1
            for key, value in last.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            if self.on_step is not None:
                self.on_step(self.step, last)
            if self.step % self.cfg.train.log_every == 0 or self.step == boundary:
                means = {key: sums[key] / counts[key] for key in sums}
                sums, counts = {}, {}
                self.log({"step": self.step, **means, "lr": self.opt.param_groups[0]["lr"],
                          "ema_rel_distance": self.ema.relative_distance(self.student),
                          "data_wait_s": (self.batches.wait_seconds - w0) / n,
                          "teacher_data_s": (self.data.teacher_seconds - s0) / n,
                          "step_s": (time.perf_counter() - t0) / n})
                t0, w0, s0, n = time.perf_counter(), self.batches.wait_seconds, self.data.teacher_seconds, 0
        return last

    # ------------------------------------------------------------ logging and export
    def log(self, row: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.scalars(row)

    def trim_log(self) -> None:
        """After a resume, drop log lines of steps the checkpoint does not contain (they will be redone) and
        a torn line (a write cut short by a full disk or a kill); the file is rewritten atomically."""
        from pipeline.files import atomic_write_bytes

        if self.log_path is None or not self.log_path.exists():
            return
        rows, torn = [], 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
                step = int(row["step"]) if row is not None else None
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if step is not None and step <= self.step:
                rows.append(line)
        if torn:
            print(f"warning: {self.log_path}: dropped {torn} unreadable line(s) (a write cut short)")
        atomic_write_bytes(self.log_path, "".join(r + "\n" for r in rows).encode())

    def ema_student(self) -> torch.nn.Module:
        """A copy of the student carrying the EMA weights, LoRA merged into the base weights."""
        if self.lora:
            from pipeline.lora import merged_copy

            return merged_copy(self.student, self.ema.shadow)
        # a fresh copy of the student's structure (DDP's replicated module refuses deepcopy), its weights loaded
        net = self.method.wrap_student(copy.deepcopy(self.data.teacher.transformer).float())
        net.load_state_dict(self.student.state_dict())
        self.ema.copy_to(net)
        return net.eval().requires_grad_(False)

