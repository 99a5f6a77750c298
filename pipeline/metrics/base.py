"""The metric interface and registry: a metric says what it measures and needs, and scores one unit's samples.

Shaped like the method registry (pipeline/methods/base.py): a metric module in this package registers its
class by name; the evaluate stage computes every registered metric that applies to the run (or those named in
`evaluate.metrics`), and the report takes each metric's title, direction, description, number format and
sample-size warning from its class. Adding a metric is one new module here (and its test): docs/metrics.md.

A metric declares
- `name` (the score rows' `metric` column), `title`, `better` ("lower" | "higher"), `description` (one line
  for the report's metric table);
- `needs`: what it reads besides the decoded images, from the shared `EvalContext` ("features" = the
  `evaluate.features` space, "classifier", "teacher_outputs", ...), and `weights`: the config key of a local
  weights path it loads (e.g. "evaluate.clip_path"), checked before any model loads;
- `applies(cfg)`: whether this run computes it at all; `score(samples)`: its value for one unit, or None
  where it is undefined (e.g. the teacher against itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.teacher_outputs import load_outputs, outputs_path

METRICS: dict[str, type["Metric"]] = {}


def register(cls: type["Metric"]) -> type["Metric"]:
    if not cls.name or cls.better not in ("lower", "higher"):
        raise ValueError(f"metric {cls.__name__} needs a name and better = 'lower' or 'higher'")
    METRICS[cls.name] = cls
    return cls


def pil_images(images01: torch.Tensor) -> list:
    """The samples as 8-bit RGB PIL images: what the preference models' reference code reads from PNG files,
    so their PIL resizes see the same pixels (grey samples are converted to RGB as `Image.convert` does)."""
    from PIL import Image

    from pipeline.images import to_uint8

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in to_uint8(images01)]


def clip_embeds(x) -> torch.Tensor:
    """get_*_features returns a tensor (transformers < 5) or an output object with pooler_output (>= 5)."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


class BatchedScorer:
    """A per-(image, prompt) scorer: `batch_scores(images01, prompts)` -> [B] for one chunk; calling it scores
    all pairs in chunks of `batch`, joined on the CPU."""

    def batch_scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images01: torch.Tensor, prompts: list[str], batch: int = 64) -> torch.Tensor:
        return torch.cat([self.batch_scores(images01[i:i + batch], prompts[i:i + batch]).cpu()
                          for i in range(0, len(prompts), batch)])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def metric_dtype(cfg) -> torch.dtype:
    """The dtype metric models run in (`evaluate.metric_dtype`)."""
    return DTYPES[getattr(cfg.evaluate, "metric_dtype", "float32")]


def config_value(cfg, dotted: str) -> Any:
    """`config_value(cfg, "evaluate.clip_path")` -> cfg.evaluate.clip_path."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@dataclass
class Samples:
    """One evaluation unit's samples, as every metric sees them."""
    kind: str                     # "teacher" | "student"
    seed: int                     # the evaluation seed
    x: torch.Tensor               # final samples in the ODE's space (pixels or latents), [N, ...]
    images: torch.Tensor          # decoded images [N, C, H, W] in [0, 1]
    prompts: list[str]            # the prompt of each sample
    noise_seeds: np.ndarray       # the per-sample noise seeds (stages.evaluate.noise_seeds)
    key: str                      # the unit's key (unique: a name for scratch files)


class EvalContext:
    """What the metrics of one evaluate worker share: the run config, the device, the teacher (its decoder),
    the evaluate directory, and models several metrics use, built on first use and kept for the process."""

    def __init__(self, cfg, device, teacher, root: Path):
        self.cfg, self.device, self.teacher, self.root = cfg, torch.device(device), teacher, Path(root)
        self._shared: dict[str, Any] = {}

    def shared(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._shared:
            self._shared[name] = build()
        return self._shared[name]

    def classifier(self):
        """The embedded teacher's digit classifier (None for other teachers)."""
        if self.cfg.teacher.kind != "embedded":
            return None
        from pipeline.metrics.classifier import load_classifier

        return self.shared("classifier", lambda: load_classifier(self.cfg.stage_dir("teacher"), self.device))

    def teacher_outputs(self, seed: int, noise_seeds: np.ndarray) -> torch.Tensor:
        """The teacher's final samples of evaluation seed `seed` (saved by the evaluate stage's teacher job)."""
        return load_outputs(outputs_path(self.root, seed), noise_seeds)


class Metric:
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    better: ClassVar[str] = "lower"               # "lower" | "higher"
    description: ClassVar[str] = ""               # one line for the report
    needs: ClassVar[tuple[str, ...]] = ()         # EvalContext inputs besides the images
    weights: ClassVar[str | None] = None          # config key of a local weights path it loads
    when: ClassVar[str] = "always"                # when it applies, in words (for `applies`)
    order: ClassVar[int] = 100                    # position in the report's tables
    digits: ClassVar[int] = 2                     # decimals in the report
    exponent_below: ClassVar[float] = 0.0         # nonzero values smaller than this print as 1.2e-04
    min_samples: ClassVar[int] = 2                # fewer samples per unit: the report warns the value means little

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx

    @classmethod
    def applies(cls, cfg) -> bool:
        """Whether this run computes the metric (e.g. CLIP score only with a CLIP model)."""
        return True

    @classmethod
    def check(cls, cfg) -> None:
        """Problems a user can fix, as one-line UserErrors before any model loads (default: `weights` exists)."""
        path = config_value(cfg, cls.weights) if cls.weights else None
        if path and not Path(path).expanduser().exists():
            raise UserError(f"{cls.weights} {path} does not exist (the {cls.title} weights are read locally)")

    @classmethod
    def warnings(cls, cfg) -> list[str]:
        """Lines the driver prints once every check has passed (e.g. a feature space not comparable with papers)."""
        return []

    @classmethod
    def prepare(cls, cfg) -> None:
        """Driver side, once per evaluate run, before any unit (e.g. write a reference folder)."""

    @classmethod
    def teacher_note(cls, cfg) -> str:
        """Why the teacher has no value, said under the report's table when it has none."""
        return "not scored for the teacher"

    @classmethod
    def min_samples_for(cls, features: str | None) -> int:
        return cls.min_samples

    @classmethod
    def details(cls, cfg) -> str:
        """How this run computes it (feature space, reference, ...), for the report's run summary; "" if nothing."""
        return ""

    @classmethod
    def format(cls, value: float) -> str:
        if 0 < abs(value) < cls.exponent_below:
            return f"{value:.1e}"
        return f"{value:.{cls.digits}f}"

    @classmethod
    def needs_text(cls) -> str:
        parts = list(cls.needs) + ([f"`{cls.weights}`"] if cls.weights else [])
        return ", ".join(parts) or "the images"

    def score(self, samples: Samples) -> float | None:
        raise NotImplementedError


class PromptScoreMetric(Metric):
    """A per-(image, prompt) score from a model whose local weights path is the config key `weights`: computed
    when that key is set, its scorer built once per worker (`build_scorer`, shared under `scorer_name`), the
    unit's value the mean over samples."""
    better: ClassVar[str] = "higher"
    min_samples: ClassVar[int] = 100            # the standard error of a mean still matters below ~100 samples
    scorer_name: ClassVar[str] = ""             # EvalContext.shared key (default: the metric's name)
    batch_from_config: ClassVar[bool] = True    # score in `evaluate.batch_size` chunks (else the scorer's default)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.weights and "when" not in cls.__dict__:
            cls.when = f"{cls.weights} is set"

    @classmethod
    def applies(cls, cfg) -> bool:
        return bool(config_value(cfg, cls.weights))

    @classmethod
    def build_scorer(cls, ctx: EvalContext) -> Callable[..., torch.Tensor]:
        """The scorer: (images01 [N, C, H, W], prompts, batch) -> [N] scores."""
        raise NotImplementedError

    def __init__(self, ctx: EvalContext):
        super().__init__(ctx)
        self.scorer = ctx.shared(self.scorer_name or self.name, lambda: self.build_scorer(ctx))

    def score(self, samples: Samples) -> float | None:
        if not self.batch_from_config:
            return float(self.scorer(samples.images, samples.prompts).mean())
        return float(self.scorer(samples.images, samples.prompts, self.ctx.cfg.evaluate.batch_size).mean())
