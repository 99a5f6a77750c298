"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H/14 fine-tuned on human preferences.

score(image, prompt) = exp(logit_scale) * cos(E_img(image), E_txt(prompt)), as yuvalkirstain/PickScore's
inference example computes it: `model.logit_scale.exp() * (text_embs @ image_embs.T)` on L2-normalised
`get_text_features` / `get_image_features`. Preprocessing is the CLIP-H processor's (laion/CLIP-ViT-H-14-laion2B-
s32B-b79K `preprocessor_config.json`): PIL bicubic resize of the shorter side to 224, centre crop 224, x / 255,
normalised with OpenAI CLIP's mean and std; prompts are tokenised with padding, truncated at 77 tokens.

Weights: `evaluate.pickscore_path`, a local transformers directory holding PickScore_v1's `config.json` and
weights plus the CLIP-H processor files (`preprocessor_config.json` and the tokenizer); docs/metrics.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.metrics.base import (BatchedScorer, EvalContext, PromptScoreMetric, clip_embeds, metric_dtype,
                                   pil_images, register)

MAX_TOKENS = 77


class PickScorer(BatchedScorer):
    """PickScore per (image, prompt) pair, from a local directory (model + processor), loaded once."""

    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32, key: str = "evaluate.pickscore_path"):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        p = Path(path).expanduser()
        try:
            self.model = CLIPModel.from_pretrained(str(p), local_files_only=True).to(device, dtype).eval()
            # The PIL processor: the reference ran transformers 4's CLIPImageProcessor, which resized with PIL
            # (transformers 5's default processor resizes with torchvision and gives other pixels).
            self.image_processor = CLIPImageProcessorPil.from_pretrained(str(p), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{key}: cannot load PickScore from {p}: {str(exc).splitlines()[0]}") from None
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def embeddings(self, images01: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings [B, D] in float32."""
        pixels = self.image_processor(images=pil_images(images01), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        img = clip_embeds(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        txt = clip_embeds(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                   attention_mask=text["attention_mask"].to(self.device))).float()
        return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def batch_scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.embeddings(images01, prompts)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)


@register
class PickScore(PromptScoreMetric):
    name, title, order = "pickscore", "PickScore", 32
    description = ("exp(logit scale) x cosine of PickScore's CLIP-H image and prompt embeddings (Kirstain et al. "
                   "2023): human preference.")
    weights = "evaluate.pickscore_path"

    @classmethod
    def check(cls, cfg) -> None:
        from pipeline.metrics.alignment import check_clip_dir

        if cfg.evaluate.pickscore_path:
            p = check_clip_dir(cfg.evaluate.pickscore_path, cls.weights)
            if not (p / "preprocessor_config.json").is_file():
                raise UserError(f"{cls.weights} {p} has no preprocessor_config.json: copy the CLIP-H processor "
                                f"files (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) into it (docs/metrics.md)")

    @classmethod
    def build_scorer(cls, ctx: EvalContext) -> PickScorer:
        return PickScorer(ctx.cfg.evaluate.pickscore_path, ctx.device, metric_dtype(ctx.cfg))
