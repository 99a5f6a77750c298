"""SD3 teacher from a local diffusers pipeline directory (offline: `from_pretrained(..., local_files_only=True)`).

Prompts go through the pipeline's own `encode_prompt` (CLIP-L + CLIP-G, plus T5 when the dir has it), the
velocity through `sd3_velocity`, and latents back to images through the VAE. The pipeline loads in
`teacher.dtype` (docs/precision.md); `teacher.kwargs` may set `max_sequence_length` (T5 tokens) and
`use_t5` (false skips T5).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import UserError, local_dir
from pipeline.teachers.base import DTYPES, TransformerTeacher

REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def check_sd3_dir(path) -> Path:
    """The directory must be a saved SD3 pipeline: model_index.json and every component folder it needs."""
    if not path:
        raise UserError("teacher.path is empty: point it at a local diffusers SD3 pipeline directory")
    p = local_dir(path, "teacher.path", "a local diffusers SD3 pipeline directory, e.g. one written by "
                  "StableDiffusion3Pipeline.save_pretrained", problem="does not exist")
    if not (p / "model_index.json").is_file():
        raise UserError(f"teacher.path {p} has no model_index.json: not a diffusers pipeline directory")
    missing = [c for c in REQUIRED if not (p / c).is_dir()]
    if missing:
        raise UserError(f"teacher.path {p} lacks component folder(s) {', '.join(missing)}")
    for component in ("transformer", "vae"):
        if not (p / component / "config.json").is_file() or not has_weights(p / component):
            raise UserError(f"teacher.path {p}: {component}/ has no config.json or no weights "
                            f"(*.safetensors / *.bin); the pipeline directory is incomplete")
    return p


def has_weights(directory: Path) -> bool:
    return any(Path(directory).glob("*.safetensors")) or any(Path(directory).glob("*.bin"))


def transformer_depth(path) -> int | None:
    """The number of transformer blocks, read from transformer/config.json alone (no weights loaded)."""
    try:
        return int(json.loads((Path(path).expanduser() / "transformer" / "config.json").read_text())["num_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _has_t5(p: Path) -> bool:
    index = json.loads((p / "model_index.json").read_text())
    entry = index.get("text_encoder_3") or [None, None]
    return entry[0] is not None and (p / "text_encoder_3").is_dir() and (p / "tokenizer_3").is_dir()


def check_t5(p: Path, use_t5: bool | None) -> bool:
    """Whether the teacher runs T5: `use_t5` None = when the directory has it; true on a directory without
    text_encoder_3 / tokenizer_3 is a UserError (it would run without T5 under a T5 config's fingerprint)."""
    if use_t5 and not _has_t5(p):
        raise UserError(f"teacher.kwargs.use_t5 is true but {p} has no T5 (text_encoder_3 / tokenizer_3): "
                        f"set use_t5: false, or leave it out to use T5 when the directory has it")
    return _has_t5(p) if use_t5 is None else bool(use_t5)


def describe_sd3(path, max_sequence_length: int = 256, use_t5: bool | None = None, **_):
    """The layout from the pipeline's config files alone (no weights read). Token count as encode_prompt
    builds it: CLIP's context (padded to the joint width) + max_sequence_length T5 tokens (zeros without T5)."""
    from pipeline.teachers.base import TeacherLayout

    p = check_sd3_dir(path)
    t5 = check_t5(p, use_t5)
    tc = json.loads((p / "transformer" / "config.json").read_text())
    vae = json.loads((p / "vae" / "config.json").read_text())
    tok = json.loads((p / "tokenizer" / "tokenizer_config.json").read_text()).get("model_max_length", 77)
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    size = tc["sample_size"]
    return TeacherLayout.of((tc["in_channels"], size, size),
                            {"encoder_hidden_states": (tok + max_sequence_length, tc["joint_attention_dim"]),
                             "pooled_projections": (tc["pooled_projection_dim"],)},
                            (vae.get("in_channels", 3), size * factor, size * factor),
                            {} if t5 else _clip_extent(p, tok))


def _clip_width(p: Path) -> int:
    """The features of SD3's CLIP context: both CLIP encoders' hidden states side by side (768 + 1280), which
    encode_prompt pads with zeros to the joint width, as it pads the missing T5's tokens."""
    return sum(json.loads((p / name / "config.json").read_text())["hidden_size"]
               for name in ("text_encoder", "text_encoder_2"))


def _clip_extent(p: Path, tokens: int) -> dict:
    """The non-zero block of the text condition without T5 (TeacherLayout.cond_extents); none when the CLIP
    configs do not say their widths (the rows are then stored whole: only space is lost)."""
    try:
        return {"encoder_hidden_states": (tokens, _clip_width(p))}
    except (OSError, KeyError, TypeError, ValueError):
        return {}


def load_sd3_teacher(path, device="cpu", dtype: str = "float32", max_sequence_length: int = 256,
                     use_t5: bool | None = None, **unknown) -> TransformerTeacher:
    """A frozen SD3 teacher: sample_shape = (in_channels, sample_size, sample_size) latents."""
    from diffusers import StableDiffusion3Pipeline

    if unknown:
        raise UserError(f"unknown teacher.kwargs for sd3: {', '.join(sorted(unknown))} "
                        f"(known: max_sequence_length, use_t5; the precision is teacher.dtype)")
    p = check_sd3_dir(path)
    extra = {} if check_t5(p, use_t5) else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(p), local_files_only=True,
                                                        dtype=DTYPES[dtype], **extra)
    except Exception as exc:  # corrupt or partial dirs fail deep inside diffusers/transformers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"teacher.path {p} cannot be loaded as an SD3 pipeline: {type(exc).__name__}: "
                        f"{first[:200]}") from None
    pipe = pipe.to(device)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        if module is not None:
            module.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        # SD3's unconditional condition is the encoding of "" (its default negative prompt), so "" needs no case.
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  device=torch.device(device), do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        # The latent distribution's mean (deterministic, as for a distillation data set), then SD3's
        # normalisation: z = (mean - shift_factor) * scaling_factor (the inverse of `decode`).
        vae = pipe.vae
        mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    tc = pipe.transformer.config
    teacher = TransformerTeacher(pipe.transformer, encode, decode, (tc.in_channels, tc.sample_size, tc.sample_size),
                                 encode_images=encode_images)
    teacher.pipeline = pipe            # the loaded components, e.g. for a CLIP score with the same tokenizer
    return teacher
