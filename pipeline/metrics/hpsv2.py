"""HPSv2 (Wu et al. 2023, "Human Preference Score v2"): OpenCLIP ViT-H/14 fine-tuned on HPD v2.

score(image, prompt) = 100 x cos(E_img(image), E_txt(prompt)), as tgxs002/HPSv2's `img_score.score` computes
it: the model's `image_features @ text_features.T` (features L2-normalised, no logit scale), diagonal; tables
(HPSv2's benchmark, the FlowSteer paper) print it x 100, e.g. 26.36 for 0.2636. Preprocessing is HPSv2's
`preprocess_val` (open_clip's `image_transform(image_size, is_train=False)`): PIL bicubic resize of the shorter
side to the model's image size (224), centre crop, RGB, ToTensor, normalised with OpenAI CLIP's mean and std;
prompts through open_clip's tokenizer (77 tokens).

Weights: `evaluate.hpsv2_path`, the HPS v2 or v2.1 checkpoint file (`HPS_v2_compressed.pt` /
`HPS_v2.1_compressed.pt`: {"state_dict": ...} of an open_clip ViT-H-14), loaded into `open_clip.create_model(
evaluate.hpsv2_model)` built without pretrained weights (nothing is downloaded); docs/metrics.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.metrics.base import BatchedScorer, EvalContext, PromptScoreMetric, metric_dtype, pil_images, register

ARCH = "ViT-H-14"          # the architecture of every released HPS checkpoint


def model_name(arch: str) -> str:
    """An open_clip model name, or a model-config JSON file (registered under its stem)."""
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise UserError(f"evaluate.hpsv2_model {path} does not exist (an open_clip model config JSON or a name)")
        open_clip.add_model_config(str(path))
        return path.stem
    if open_clip.get_model_config(arch) is None:
        raise UserError(f"evaluate.hpsv2_model '{arch}' is not an open_clip model name (HPSv2 uses {ARCH})")
    return arch


def preprocess(image_size: int):
    """HPSv2's `preprocess_val`, transform by transform (torchvision on PIL images)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


class HPSScorer(BatchedScorer):
    """HPSv2 per (image, prompt) pair from a local checkpoint file, loaded once."""

    def __init__(self, path: str | Path, arch: str = ARCH, device="cpu", dtype=torch.float32,
                 key: str = "evaluate.hpsv2_path"):
        import open_clip

        p = Path(path).expanduser()
        name = model_name(arch)
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, foreign or a pickle we refuse to run
            raise UserError(f"{key} {p} is not a readable HPS checkpoint ({type(exc).__name__})") from None
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{key} {p} holds no state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"{key} {p} does not fit open_clip {name}: {str(exc).splitlines()[1].strip()}") from None
        self.model = model.to(device, dtype).eval()
        size = model.visual.image_size
        self.preprocess = preprocess(size[0] if isinstance(size, (tuple, list)) else size)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def features(self, images01: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) features [B, D] in float32."""
        x = torch.stack([self.preprocess(im) for im in pil_images(images01)]).to(self.device, self.dtype)
        img = self.model.encode_image(x, normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return img, txt

    @torch.no_grad()
    def batch_scores(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.features(images01, prompts)
        return 100 * (img * txt).sum(-1)


@register
class HPSv2(PromptScoreMetric):
    name, title, order = "hpsv2", "HPSv2", 34
    description = ("100 x cosine of the HPS v2 / v2.1 OpenCLIP ViT-H/14 image and prompt features (Wu et al. 2023): "
                   "human preference, as the FlowSteer paper's tables print it.")
    weights = "evaluate.hpsv2_path"

    @classmethod
    def check(cls, cfg) -> None:
        path = cfg.evaluate.hpsv2_path
        if path and not Path(path).expanduser().is_file():
            raise UserError(f"{cls.weights} {path} is not a file (expected HPS_v2_compressed.pt or "
                            f"HPS_v2.1_compressed.pt; docs/metrics.md)")
        if path:
            model_name(cfg.evaluate.hpsv2_model)

    @classmethod
    def build_scorer(cls, ctx: EvalContext) -> HPSScorer:
        ev = ctx.cfg.evaluate
        return HPSScorer(ev.hpsv2_path, ev.hpsv2_model, ctx.device, metric_dtype(ctx.cfg))
