"""Tiny random-init preference models in their released on-disk layouts (test helper).

- PickScore: a transformers CLIPModel directory with the CLIP processor files (PIL image processor, a
  byte-level CLIPTokenizer), as PickScore_v1 + laion CLIP-H's processor are laid out.
- HPSv2: an open_clip model-config JSON of the ViT-H-14 family's classes (open_clip.CLIP) and a checkpoint file
  {"state_dict": ...} as HPS_v2_compressed.pt holds it.
- ImageReward: ImageReward.pt with the reference repository's key names (blip.visual_encoder.*,
  blip.text_encoder.*, mlp.layers.*), med_config.json and a BERT vocab.txt.
Every model is tiny (one or two layers, widths 16-64) so building and scoring take well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "red", "square", "blue", "circle", "green", "triangle", "cat", "on", "the", "mat", "photo", "of"]


def build_pickscore_dir(directory, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from tiny_sd3 import tiny_clip_tokenizer

    d = Path(directory)
    tok = tiny_clip_tokenizer()
    tok.model_max_length = 77
    bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, hidden_act="gelu"),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8, hidden_act="gelu"),
        projection_dim=16, logit_scale_init_value=4.6052)      # exp = 100, as a trained CLIP's
    CLIPModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(d)
    return d


HPS_TINY = {"embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build_hps_files(directory, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint file, model-config JSON) of a tiny open_clip CLIP saved as HPSv2 saves its checkpoint."""
    import open_clip

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arch = d / "hps-tiny.json"
    arch.write_text(json.dumps({**HPS_TINY, "vision_cfg": dict(HPS_TINY["vision_cfg"])}))
    open_clip.add_model_config(str(arch))
    torch.manual_seed(seed)
    model = open_clip.create_model("hps-tiny", pretrained=None)
    ckpt = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return ckpt, arch


def build_imagereward_dir(directory, seed: int = 0) -> Path:
    from transformers import BertTokenizer

    from pipeline.metrics.imagereward import ImageRewardModel, load_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 1, "pad_token_id": 0, "vocab_size": len(load_tokenizer(d)),
           "encoder_width": 768, "add_cross_attention": True}
    (d / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(seed)
    model = ImageRewardModel(med, vit_width=64, vit_depth=1, patch=32, image_size=224)
    with torch.no_grad():               # unit-gain layers: the reward moves visibly with image and prompt
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
        for lin in (m for m in model.head if isinstance(m, torch.nn.Linear)):
            lin.weight.normal_(0, 1.5 / lin.in_features ** 0.5)
    state = {to_reference_key(k): v for k, v in model.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(8, 64)        # in the release, unused by the reward
    torch.save(state, d / "ImageReward.pt")
    return d


def to_reference_key(key: str) -> str:
    """ImageRewardModel key -> the reference checkpoint's name (written independently of the loader's map)."""
    vit = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
           "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
           "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    block = {"layer_norm1": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
             "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    if key.startswith("visual."):
        rest = key.removeprefix("visual.")
        if rest in vit:
            return "blip.visual_encoder." + vit[rest]
        _, _, i, tail = rest.split(".", 3)
        name, param = tail.rsplit(".", 1)
        return f"blip.visual_encoder.blocks.{i}.{block[name]}.{param}"
    if key.startswith("text."):
        return "blip.text_encoder." + key.removeprefix("text.")
    return "mlp.layers." + key.removeprefix("head.")


def metric_sections(base: Path) -> dict:
    """evaluate.* keys pointing at freshly built tiny PickScore, HPSv2 and ImageReward models under `base`."""
    ckpt, arch = build_hps_files(base / "hps")
    return {"pickscore_path": str(build_pickscore_dir(base / "pickscore")), "hpsv2_path": str(ckpt),
            "hpsv2_model": str(arch), "imagereward_path": str(build_imagereward_dir(base / "imagereward"))}
