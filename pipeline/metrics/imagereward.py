"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image features, read by BLIP's BERT text encoder through
cross-attention from the prompt's [CLS] token, then a 5-layer linear head, standardised.

score(image, prompt) = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072, as THUDM/ImageReward's
`ImageReward.score` computes it, where h_CLS = text_encoder(tokens, cross-attending to ViT(image))[:, 0].
Preprocessing is its `_transform(224)`: PIL bicubic resize of the shorter side to 224, centre crop 224, RGB,
ToTensor, normalised with OpenAI CLIP's mean and std; prompts through BLIP's BERT tokenizer (bert-base-uncased
plus "[DEC]" and "[ENC]"), padded to and truncated at 35 tokens.

The `image-reward` package pins timm 0.6.13 and imports helpers transformers 5 no longer has, so it cannot be
installed beside this project's torch/transformers; this is the same network in transformers' BLIP classes
(`BlipVisionModel` = BLIP's ViT, `BlipTextModel` = BLIP's med.py BertModel with cross-attention), loading the
released `ImageReward.pt` by renaming its keys (`reference_keys`).

Weights: `evaluate.imagereward_path`, a directory with `ImageReward.pt` and `med_config.json` (both from the
THUDM/ImageReward model repo) and bert-base-uncased's `vocab.txt`; docs/metrics.md.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError, local_dir
from pipeline.metrics.base import BatchedScorer, EvalContext, PromptScoreMetric, metric_dtype, pil_images, register

CHECKPOINT, MED_CONFIG, VOCAB = "ImageReward.pt", "med_config.json", "vocab.txt"
MEAN, STD = 0.16717362830052426, 1.0333394966054072     # ImageReward.__init__: the reward's standardisation
IMAGE_SIZE, MAX_TOKENS = 224, 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64            # BLIP's ViTs (base: 768 / 12 heads, large: 1024 / 16) use 64-wide heads
VIT_EPS = 1e-6             # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)


def preprocess():
    """ImageReward's `_transform(224)`, transform by transform (torchvision on PIL images)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(IMAGE_SIZE),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def reward_head(width: int) -> nn.Sequential:
    """ImageReward's MLP (no activations between the linears: they are commented out in the reference)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def reference_keys(key: str) -> str | None:
    """An ImageReward.pt key -> this module's key (None: a key the reward does not use, e.g. vision_proj)."""
    vit = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
           "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
           "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    if key.startswith("blip.visual_encoder."):
        rest = key.removeprefix("blip.visual_encoder.")
        if rest in vit:
            return "visual." + vit[rest]
        if rest.startswith("blocks."):
            _, i, tail = rest.split(".", 2)
            name, param = tail.rsplit(".", 1)
            return f"visual.encoder.layers.{i}.{block[name]}.{param}" if name in block else None
        return None
    if key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("mlp.layers."):
        return "head." + key.removeprefix("mlp.layers.")
    return None


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + the reward head; sizes read from the checkpoint."""

    def __init__(self, med_config: dict, vit_width: int, vit_depth: int, patch: int, image_size: int):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.visual = BlipVisionModel(BlipVisionConfig(
            hidden_size=vit_width, intermediate_size=4 * vit_width, num_hidden_layers=vit_depth,
            num_attention_heads=max(1, vit_width // HEAD_WIDTH), image_size=image_size, patch_size=patch,
            hidden_act="gelu", layer_norm_eps=VIT_EPS, attention_dropout=0.0, initializer_range=0.02))
        c = med_config
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], encoder_hidden_size=vit_width,
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c.get("hidden_act", "gelu"), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            pad_token_id=c.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, eos_token_id=None,
            is_decoder=True),   # is_decoder: build the cross-attention
            add_pooling_layer=False)
        self.head = reward_head(c["hidden_size"])

    def cls_features(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h_CLS: the text encoder's first token, cross-attending to every ViT token (all unmasked)."""
        image_embeds = self.visual(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)     # bidirectional, as BLIP's encoder
        return out.last_hidden_state[:, 0, :].float()

    def reward(self, h_cls: torch.Tensor) -> torch.Tensor:
        return ((self.head.float()(h_cls) - MEAN) / STD).squeeze(-1)


def load_model(directory: Path, key: str = "evaluate.imagereward_path") -> ImageRewardModel:
    """ImageReward.pt (+ med_config.json) -> ImageRewardModel; the ViT's sizes follow the checkpoint's shapes."""
    try:
        med = json.loads((directory / MED_CONFIG).read_text())
        blob = torch.load(directory / CHECKPOINT, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable config, truncated or refused checkpoint
        raise UserError(f"{key} {directory}: cannot read {MED_CONFIG} / {CHECKPOINT} ({type(exc).__name__})") from None
    blob = blob.get("state_dict", blob) if isinstance(blob, dict) else {}
    state = {reference_keys(k): v for k, v in blob.items() if reference_keys(k)}
    try:
        width = state["visual.embeddings.class_embedding"].shape[-1]
        patch = state["visual.embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(state["visual.embeddings.position_embedding"].shape[1] - 1)
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("visual.encoder.layers."))
        model = ImageRewardModel(med, width, depth, patch, grid * patch)
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{key} {directory / CHECKPOINT} is not an ImageReward checkpoint "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model.eval()


def load_tokenizer(directory: Path):
    """BLIP's `init_tokenizer`: bert-base-uncased with bos "[DEC]" and the extra special token "[ENC]"."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(directory), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer(BatchedScorer):
    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32, key: str = "evaluate.imagereward_path"):
        d = Path(path).expanduser()
        self.model = load_model(d, key).to(device)
        self.model.visual.to(dtype)
        self.model.text.to(dtype)
        self.tokenizer = load_tokenizer(d)
        self.preprocess = preprocess()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def features(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in pil_images(images01)]).to(self.device, self.dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")
        return self.model.cls_features(pixels, text["input_ids"].to(self.device),
                                       text["attention_mask"].to(self.device))

    @torch.no_grad()
    def batch_scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.model.reward(self.features(images01, prompts))


@register
class ImageReward(PromptScoreMetric):
    name, title, order = "imagereward", "ImageReward", 36
    description = ("BLIP-based reward model trained on human rankings (Xu et al. 2023), standardised over its "
                   "training prompts: 0 = an average image there, higher is preferred.")
    weights = "evaluate.imagereward_path"

    @classmethod
    def check(cls, cfg) -> None:
        path = cfg.evaluate.imagereward_path
        if not path:
            return
        d = local_dir(path, cls.weights, f"{CHECKPOINT}, {MED_CONFIG} and bert-base-uncased's {VOCAB}; "
                      f"docs/metrics.md")
        missing = [f for f in (CHECKPOINT, MED_CONFIG, VOCAB) if not (d / f).is_file()]
        if missing:
            raise UserError(f"{cls.weights} {d} has no {', '.join(missing)} (docs/metrics.md says where each comes from)")

    @classmethod
    def build_scorer(cls, ctx: EvalContext) -> ImageRewardScorer:
        return ImageRewardScorer(ctx.cfg.evaluate.imagereward_path, ctx.device, metric_dtype(ctx.cfg))
