"""PickScore, HPSv2 and ImageReward on tiny random models of their real classes, loaded by the real loading code
from their released on-disk layouts (tests/tiny_metrics.py), each checked against a hand computation of its
reference formula: the reference preprocessing written out here with PIL and numpy, the model's own towers on
the resulting tensors, and the scaling. Changing a metric's resize, normalisation or scale breaks these."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_metrics import build_hps_files, build_imagereward_dir, build_pickscore_dir

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PROMPTS = ["a red square", "a blue circle on the mat", "a photo of a cat"]


def _images(seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    """Three non-square RGB samples in [0, 1] (so the resize and the centre crop both matter)."""
    return torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _pil(images01: torch.Tensor) -> list[Image.Image]:
    arr = (images01.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _resize_crop_normalize(im: Image.Image, size: int, resample=Image.BICUBIC, mean=CLIP_MEAN, std=CLIP_STD):
    """Shorter side to `size` (the longer one int(size * long / short)), centre crop, /255, (x - mean) / std."""
    w, h = im.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    im = im.resize((nw, nh), resample)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    x = np.asarray(im.crop((left, top, left + size, top + size)).convert("RGB"), np.float32) / 255.0
    return torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())


def _unit(x):
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- PickScore
def _pick_by_hand(model, tokenizer, images01, prompts, size, resample=Image.BICUBIC, mean=CLIP_MEAN, scale=None):
    pixels = torch.stack([_resize_crop_normalize(im, size, resample, mean) for im in _pil(images01)])
    text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = _unit(model.get_image_features(pixel_values=pixels))
        txt = _unit(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
        s = model.logit_scale.exp() if scale is None else scale
        return s * (img * txt).sum(-1)


def test_pickscore_is_logit_scale_times_cosine_on_clip_processor_pixels(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from pipeline.metrics.pickscore import PickScorer

    d = build_pickscore_dir(tmp_path / "pick", image_size=32)
    scorer = PickScorer(d)
    images = _images()
    got = scorer(images, PROMPTS, batch=2)                 # two batches: batching must not change values
    model = CLIPModel.from_pretrained(str(d)).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    want = _pick_by_hand(model, tok, images, PROMPTS, 32)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-3)
    # the hand computation has power: each change of preprocessing or scale moves the score
    for wrong in (_pick_by_hand(model, tok, images, PROMPTS, 32, resample=Image.BILINEAR),
                  _pick_by_hand(model, tok, images, PROMPTS, 32, mean=np.full(3, 0.5, np.float32)),
                  _pick_by_hand(model, tok, images, PROMPTS, 32, scale=torch.tensor(1.0))):
        assert not torch.allclose(got, wrong, atol=1e-4)


# ---------------------------------------------------------------- HPSv2
def test_hpsv2_is_100_times_cosine_on_hps_preprocess_val_pixels(tmp_path):
    import open_clip

    from pipeline.metrics.hpsv2 import HPSScorer

    ckpt, arch = build_hps_files(tmp_path / "hps")
    scorer = HPSScorer(ckpt, str(arch))
    images = _images(1)
    got = scorer(images, PROMPTS, batch=2)
    model = open_clip.create_model("hps-tiny", pretrained=None)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    tokens = open_clip.get_tokenizer("hps-tiny")(PROMPTS)

    def by_hand(resample=Image.BICUBIC, mean=CLIP_MEAN, scale=100.0):
        pixels = torch.stack([_resize_crop_normalize(im, 224, resample, mean) for im in _pil(images)])
        with torch.no_grad():
            out = model(pixels, tokens)     # open_clip's forward: L2-normalised features (+ logit_scale)
            img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
            return scale * torch.diagonal(img @ txt.T)

    assert torch.allclose(got, by_hand(), atol=1e-4), (got, by_hand())
    for wrong in (by_hand(resample=Image.BILINEAR), by_hand(mean=np.full(3, 0.5, np.float32)),
                  by_hand(scale=float(model.logit_scale.detach().exp()))):
        assert not torch.allclose(got, wrong, atol=1e-4)


def test_hpsv2_refuses_a_checkpoint_of_another_architecture(tmp_path):
    from pipeline.errors import UserError
    from pipeline.metrics.hpsv2 import HPSScorer

    ckpt, arch = build_hps_files(tmp_path / "hps")
    bigger = tmp_path / "wider.json"
    bigger.write_text(arch.read_text().replace('"embed_dim": 16', '"embed_dim": 24'))
    with pytest.raises(UserError, match="evaluate.hpsv2_path .* does not fit open_clip wider"):
        HPSScorer(ckpt, str(bigger))


# ---------------------------------------------------------------- ImageReward
def test_imagereward_is_the_standardised_mlp_of_the_cross_attended_cls(tmp_path):
    from pipeline.metrics.imagereward import ImageRewardScorer, load_tokenizer

    d = build_imagereward_dir(tmp_path / "ir")
    scorer = ImageRewardScorer(d)
    model = scorer.model
    images = _images(2)
    got = scorer(images, PROMPTS, batch=2)
    tok = load_tokenizer(d)
    assert len(tok) == len(tok.get_vocab()) and "[ENC]" in tok.get_vocab() and "[DEC]" in tok.get_vocab()
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text["input_ids"].shape == (3, 35)

    def by_hand(resample=Image.BICUBIC, mean=CLIP_MEAN, mu=0.16717362830052426, sigma=1.0333394966054072):
        pixels = torch.stack([_resize_crop_normalize(im, 224, resample, mean) for im in _pil(images)])
        with torch.no_grad():
            h = model.cls_features(pixels, text["input_ids"], text["attention_mask"])
            linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
            for lin in linears:                   # five linears, no activations (dropout off at eval)
                h = h @ lin.weight.T + lin.bias
            return ((h - mu) / sigma).squeeze(-1)

    assert torch.allclose(got, by_hand(), atol=1e-5), (got, by_hand())
    for wrong in (by_hand(resample=Image.BILINEAR), by_hand(mean=np.full(3, 0.5, np.float32)), by_hand(mu=0.0)):
        assert not torch.allclose(got, wrong, atol=1e-5)


def test_imagereward_loads_the_reference_key_layout_exactly(tmp_path):
    """Every tensor of the released layout lands where it belongs (a renamed key fails strict loading)."""
    from pipeline.metrics.imagereward import load_model, reference_keys
    from tiny_metrics import to_reference_key

    d = build_imagereward_dir(tmp_path / "ir")
    blob = torch.load(d / "ImageReward.pt", weights_only=True)
    model = load_model(d)
    own = model.state_dict()
    for key, value in blob.items():
        mine = reference_keys(key)
        if mine is None:
            assert key == "blip.vision_proj.weight"
            continue
        assert to_reference_key(mine) == key
        assert torch.equal(own[mine], value)


def test_imagereward_cross_attention_reads_the_image(tmp_path):
    """The text [CLS] depends on the image (cross-attention is wired), and on the prompt."""
    from pipeline.metrics.imagereward import ImageRewardScorer

    scorer = ImageRewardScorer(build_imagereward_dir(tmp_path / "ir"))
    a = scorer(_images(3), PROMPTS)
    assert not torch.allclose(a, scorer(_images(4), PROMPTS), atol=1e-6)
    assert not torch.allclose(a, scorer(_images(3), PROMPTS[::-1]), atol=1e-6)


# ---------------------------------------------------------------- registry and errors
@pytest.mark.parametrize("key", ["pickscore_path", "hpsv2_path", "imagereward_path"])
def test_missing_weights_path_is_a_user_error_naming_the_key(tmp_path, key):
    from pipeline.errors import UserError
    from pipeline.metrics import metrics_for
    from schemas.config import RunConfig

    cfg = RunConfig.model_validate({"root": str(tmp_path / "runs"),
                                    "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher"},
                                    "evaluate": {key: str(tmp_path / "nowhere")}})
    chosen = [m for m in metrics_for(cfg) if m.weights == f"evaluate.{key}"]
    assert len(chosen) == 1
    with pytest.raises(UserError, match=f"evaluate.{key} .*nowhere"):
        chosen[0].check(cfg)


def _reference_imagereward(blob: dict, med: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """THUDM/ImageReward's forward written out from its checkpoint's own tensors (BLIP vit.py: pre-norm blocks,
    LayerNorm eps 1e-6; BLIP med.py BertLayer in 'multimodal' mode: post-norm self-attention, cross-attention
    to every image token, feed-forward; additive mask -10000), independent of transformers' BLIP classes."""
    F = torch.nn.functional

    def w(name):
        return blob[name].float()

    def lin(x, name):
        return x @ w(name + ".weight").T + w(name + ".bias")

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps)

    v = "blip.visual_encoder."
    patch = w(v + "patch_embed.proj.weight")
    x = F.conv2d(pixels, patch, w(v + "patch_embed.proj.bias"), stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w(v + "cls_token").expand(len(x), -1, -1), x], 1) + w(v + "pos_embed")
    width = x.shape[-1]
    heads = width // 64
    depth = 1 + max(int(k.split(".")[3]) for k in blob if k.startswith(v + "blocks."))
    for i in range(depth):
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = lin(h, b + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        x = x + lin((att @ qkv[2]).transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t, eps, nh = "blip.text_encoder.", med["layer_norm_eps"], med["num_attention_heads"]
    pos = torch.arange(ids.shape[1])
    h = ln(w(t + "embeddings.word_embeddings.weight")[ids] + w(t + "embeddings.position_embeddings.weight")[pos],
           t + "embeddings.LayerNorm", eps)

    def attention(q_in, kv_in, prefix, add_mask):
        q, k, vv = lin(q_in, prefix + "self.query"), lin(kv_in, prefix + "self.key"), lin(kv_in, prefix + "self.value")
        split = lambda z: z.reshape(z.shape[0], z.shape[1], nh, -1).transpose(1, 2)   # noqa: E731
        q, k, vv = split(q), split(k), split(vv)
        s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + add_mask
        ctx = (s.softmax(-1) @ vv).transpose(1, 2).reshape(q_in.shape)
        return ln(lin(ctx, prefix + "output.dense") + q_in, prefix + "output.LayerNorm", eps)

    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        layer = f"{t}encoder.layer.{i}."
        a = attention(h, h, layer + "attention.", self_mask)
        a = attention(a, image, layer + "crossattention.", 0.0)
        h = ln(lin(F.gelu(lin(a, layer + "intermediate.dense")), layer + "output.dense") + a,
               layer + "output.LayerNorm", eps)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_imagereward_matches_the_reference_network_written_from_its_checkpoint(tmp_path):
    """transformers' BLIP classes compute what BLIP's vit.py + med.py compute on the released checkpoint."""
    import json

    from pipeline.metrics.imagereward import ImageRewardScorer, load_tokenizer

    d = build_imagereward_dir(tmp_path / "ir")
    scorer = ImageRewardScorer(d)
    images = _images(5)
    got = scorer(images, PROMPTS)
    pixels = torch.stack([_resize_crop_normalize(im, 224) for im in _pil(images)])
    text = load_tokenizer(d)(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    want = _reference_imagereward(torch.load(d / "ImageReward.pt", weights_only=True),
                                  json.loads((d / "med_config.json").read_text()), pixels, text["input_ids"],
                                  text["attention_mask"])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
