"""Prompt alignment: does the sample show what its prompt asked for?

- Embedded default: the digit classifier's accuracy on the prompted digit (10 classes, chance = 10%).
- Real teachers: CLIP score (Hessel et al. 2021), 100 * max(cos(E_img, E_txt), 0), with a local CLIP
  directory (transformers CLIPModel / CLIPProcessor, loaded offline).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError, local_dir
from pipeline.metrics.base import (BatchedScorer, EvalContext, Metric, PromptScoreMetric, Samples, clip_embeds,
                                   register)


def digit_labels(prompts: list[str]) -> list[int] | None:
    """The digit each prompt asks for (index in DIGIT_PROMPTS), or None if any prompt is not a digit prompt."""
    from pipeline.digits import DIGIT_PROMPTS

    index = {p: i for i, p in enumerate(DIGIT_PROMPTS)}
    return [index[p] for p in prompts] if all(p in index for p in prompts) else None


@torch.no_grad()
def prompt_hits(classifier, images01: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Per sample: 1.0 where the classifier reads the prompted digit, else 0.0 (mean = prompt accuracy)."""
    preds = torch.cat([classifier.predict(images01[i:i + batch]).cpu() for i in range(0, len(images01), batch)])
    return (preds == labels.cpu()).float()


def check_clip_dir(path: str | Path, key: str = "evaluate.clip_path") -> Path:
    """Before any work: `key` (evaluate.clip_path, evaluate.pickscore_path) must be a transformers CLIP dir
    (config.json with a CLIP model_type, weights, tokenizer files); anything else is one line, not a 139-line
    load report."""
    import json

    p = local_dir(path, key, "a transformers CLIP model dir with config.json, weights and the processor files")
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        model_type = None
    weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
    tokenizer = (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()
    if model_type is None or "clip" not in str(model_type).lower() or not weights or not tokenizer:
        what = ("no readable config.json" if model_type is None else f"model_type '{model_type}' is not CLIP"
                if "clip" not in str(model_type).lower() else "no weights" if not weights else "no tokenizer files")
        raise UserError(f"{key} {p} is not a CLIP model directory ({what})")
    return p


class ClipScorer(BatchedScorer):
    """CLIP score per (image, prompt) pair from a local transformers CLIP directory."""

    def __init__(self, path: str | Path, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        p = check_clip_dir(path)
        try:
            self.model = CLIPModel.from_pretrained(str(p), local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load CLIP from {p}: {str(exc).splitlines()[0]}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def batch_scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        imgs = images01.float().clamp(0, 1)
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)   # grey samples: CLIP wants RGB
        inputs = self.processor(text=prompts, images=list(imgs.cpu()), return_tensors="pt",
                                padding=True, truncation=True, do_rescale=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = clip_embeds(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = clip_embeds(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs.get("attention_mask")))
        return 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp_min(0)


@register
class PromptAccuracy(Metric):
    name, title, better, order, digits = "prompt_accuracy", "Prompt accuracy", "higher", 20, 3
    description = ("Share of samples the digit classifier reads as the prompted digit (chance 0.10). "
                   "Prompt alignment for the embedded default.")
    needs = ("classifier",)
    when = "the embedded teacher's digit classifier and digit prompts"
    min_samples = 100                 # the binomial standard error is still 0.05 at 100 samples

    @classmethod
    def applies(cls, cfg) -> bool:
        return cfg.teacher.kind == "embedded"

    def score(self, samples: Samples) -> float | None:
        labels = digit_labels(samples.prompts)
        if labels is None:
            return None
        return float(prompt_hits(self.ctx.classifier(), samples.images, torch.tensor(labels)).mean())


@register
class ClipScore(PromptScoreMetric):
    name, title, order = "clip_score", "CLIP score", 30
    description = "100 x cosine(CLIP image, CLIP prompt), clipped at 0 (Hessel et al. 2021). Prompt alignment."
    weights = "evaluate.clip_path"
    scorer_name = "clip"                 # the CLIP trajectory statistics load the same model
    batch_from_config = False

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.evaluate.clip_path:
            check_clip_dir(cfg.evaluate.clip_path)

    @classmethod
    def build_scorer(cls, ctx: EvalContext) -> ClipScorer:
        return ClipScorer(ctx.cfg.evaluate.clip_path, ctx.device)
