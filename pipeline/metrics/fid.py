"""FID through clean-fid (Parmar et al. 2022) between two PNG folders, in a pluggable feature space.

Feature spaces:
- inception: the standard FID network, clean-fid's torchscript `inception-2015-12-05.pt` read from a local
  file (clean-fid's own loader downloads it when missing; we never download), images bicubic-resized to 299
  by clean-fid's "clean" resizer.
- classifier: the embedded digit classifier's penultimate layer (`DigitClassifier.features`), images at
  their native 32x32: the FID analogue for MNIST-sized samples (Inception features are poor on digits).
- pixels: raw pixels average-pooled to at most 16x16; a model-free stand-in for toy teachers and tests.

Images go to disk as 8-bit PNGs first (the quantisation every published FID includes); clean-fid reads each
folder and resizes (`get_folder_features`) and computes the Frechet distance of the two Gaussian fits
(`fid_from_feats`, Heusel et al. 2017, eq. 6).
"""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UserError
from pipeline.files import atomic_path, atomic_write_bytes, temp_name
from pipeline.images import to_uint8
from pipeline.metrics.base import EvalContext, Metric, Samples, register
from pipeline.metrics.frechet import frechet_from_features

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE

# clean-fid calls extract(batch) with batch [B, 3, H, W] float in [0, 255] (PNG read as RGB).
Extract = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FeatureSpace:
    """What clean-fid needs: an extractor and a resize (None = clean-fid's own 299x299 bicubic)."""
    name: str
    extract: Extract
    resize: Callable[[np.ndarray], np.ndarray] | None = None


def write_png_folder(images: np.ndarray | torch.Tensor, directory: Path, start: int = 0) -> Path:
    """Write images ([N, H, W, C] uint8, or [N, C, H, W] in [0, 1]) as 000000.png, 000001.png, ..."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(arr):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(directory / f"{start + i:06d}.png")
    return directory


def _native_size(img: np.ndarray) -> np.ndarray:
    return img                          # keep 32x32: the classifier was trained at that size


def _gray01(batch: torch.Tensor) -> torch.Tensor:
    """clean-fid's [B, 3, H, W] 0..255 batch (grey PNGs become 3 equal channels) -> [B, 1, H, W] in [0, 1]."""
    return batch.float().mean(1, keepdim=True) / 255


def classifier_space(classifier) -> FeatureSpace:
    """The embedded default: penultimate features of the digit classifier."""
    return FeatureSpace("classifier", lambda b: classifier.features(_gray01(b)), _native_size)


def pixel_space(max_size: int = 16) -> FeatureSpace:
    """Flattened pixels (average-pooled to <= max_size per side): a model-free feature space."""
    def extract(batch):
        x = batch.float() / 255
        if x.shape[-1] > max_size:
            x = F.adaptive_avg_pool2d(x, max_size)
        return x.flatten(1)
    return FeatureSpace("pixels", extract, _native_size)


def resolve_inception(path: str | Path | None) -> Path:
    """The local Inception file (`path` is the file or its folder); a one-line UserError when absent."""
    if not path:
        raise UserError(f"evaluate.features is 'inception' but evaluate.inception_path is not set: put clean-fid's "
                        f"{INCEPTION_FILE} (from {INCEPTION_URL}) on this machine and point inception_path at it")
    p = Path(path).expanduser()
    p = p / INCEPTION_FILE if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"Inception weights not found at {p}: download {INCEPTION_URL} on a machine with "
                        f"internet and copy it there (it is never downloaded by flowsteer)")
    return p


def inception_space(path: str | Path | None, device) -> FeatureSpace:
    """clean-fid's torchscript Inception-v3 pool features (2048-d) on 299x299 inputs in [0, 255]."""
    p = resolve_inception(path)
    try:
        net = torch.jit.load(str(p), map_location=device).eval()
    except Exception as exc:
        raise UserError(f"{p} is not clean-fid's torchscript Inception ({type(exc).__name__}); "
                        f"expected {INCEPTION_FILE} from {INCEPTION_URL}") from None

    @torch.no_grad()
    def extract(batch):
        # the same normalisation as cleanfid.inception_torchscript.InceptionV3W (resize_inside=False)
        x = (batch.to(device).float() - 128) / 128
        return net.layers.forward(x).view(batch.shape[0], -1)
    return FeatureSpace("inception", extract, None)


def feature_space(kind: str, device, classifier=None, inception_path=None) -> FeatureSpace:
    if kind == "inception":
        return inception_space(inception_path, device)
    if kind == "classifier":
        if classifier is None:
            raise UserError("evaluate.features 'classifier' needs the embedded teacher's digit classifier; "
                            "use features: inception (with inception_path) or pixels for other teachers")
        return classifier_space(classifier)
    if kind == "pixels":
        return pixel_space()
    raise UserError(f"unknown evaluate.features '{kind}' (use classifier, inception or pixels)")


def folder_features(folder: Path, space: FeatureSpace, device="cpu", batch_size: int = 250) -> np.ndarray:
    """[N, D] features of every image in `folder`, read and resized by clean-fid (`get_folder_features`)."""
    from cleanfid import fid as cleanfid

    return cleanfid.get_folder_features(str(folder), model=space.extract, num_workers=0, batch_size=batch_size,
                                        device=torch.device(device), mode="clean", custom_fn_resize=space.resize,
                                        verbose=False)


def fid_from_features(generated: np.ndarray, reference: np.ndarray) -> float:
    """FID of two clean-fid feature sets: the Gaussian fit and eq. 6 of clean-fid's `fid_from_feats`.

    That is what `cleanfid.fid.compute_fid(fdir1, fdir2)` does after reading both folders; splitting it lets a
    run extract the reference folder's features once instead of once per (checkpoint, NFE, seed). The distance
    is computed by pipeline/metrics/frechet.py (the same formula and eps fallback; tests/test_evaluate.py checks
    it equals clean-fid's), because clean-fid calls scipy's sqrtm with an argument newer scipy no longer takes.
    """
    return frechet_from_features(np.asarray(generated, np.float64), np.asarray(reference, np.float64))


# ---------------------------------------------------------------- the registered metric
FEATURES = {"classifier": "the digit classifier's 128-d penultimate features",
            "inception": "clean-fid's Inception-v3 pool features (standard FID)",
            "pixels": "raw pixels (average-pooled to <= 16x16)"}
REFERENCES = {"digits": "the 5000 real MNIST digits", "folder": "the configured reference folder",
              "teacher": "the teacher's own samples from the same noise"}


def reference_kind(cfg) -> str:
    """Which images FID compares against: a configured folder, the real digits, or the teacher's samples."""
    if cfg.evaluate.reference:
        return "folder"
    return "digits" if cfg.teacher.kind == "embedded" else "teacher"


def digits_reference_dir(cfg) -> Path:
    return cfg.stage_dir("evaluate") / "reference" / "digits"


@register
class FID(Metric):
    name, title, better, order = "fid", "FID", "lower", 10
    description = ("Frechet distance between Gaussians fitted to features of the generated samples and of the "
                   "reference images (Heusel et al. 2017), computed through clean-fid in the feature space named "
                   "under Run. Sample quality and diversity.")
    needs = ("features", "reference")
    weights = "evaluate.inception_path"

    @classmethod
    def needs_text(cls) -> str:
        return "the `evaluate.features` space (`evaluate.inception_path` for Inception), a reference"

    @classmethod
    def min_samples_for(cls, features: str | None) -> int:
        # Below ~500 samples the covariance estimate dominates the value; Inception's 2048-d covariance is
        # not even full rank below 2048 samples.
        return 2048 if features == "inception" else 500

    @classmethod
    def check(cls, cfg) -> None:
        ev = cfg.evaluate
        if ev.features == "inception":
            resolve_inception(ev.inception_path)
        if ev.features == "classifier" and cfg.teacher.kind != "embedded":
            raise UserError("evaluate.features 'classifier' needs the embedded teacher's digit classifier; "
                            "use features: inception (with inception_path) or pixels for other teachers")
        if ev.reference and not Path(ev.reference).expanduser().is_dir():
            raise UserError(f"evaluate.reference {ev.reference} is not a folder of images")

    @classmethod
    def warnings(cls, cfg) -> list[str]:
        if cfg.evaluate.features == "pixels" and cfg.teacher.kind != "embedded":
            return ["FID on raw pixels (evaluate.features: pixels) is not comparable with published FID; set "
                    f"evaluate.inception_path to clean-fid's {INCEPTION_FILE} for standard FID"]
        return []

    @classmethod
    def prepare(cls, cfg) -> None:
        """The real digits as PNGs once per run (the FID reference of the embedded default)."""
        if reference_kind(cfg) != "digits":
            return
        out = digits_reference_dir(cfg)
        if (out / "_complete").is_file():
            return
        from pipeline.digits import load_digits

        images, _ = load_digits()
        with atomic_path(out) as tmp:
            write_png_folder((images + 1) / 2, tmp)
            (tmp / "_complete").write_text(f"{len(images)}\n")

    @classmethod
    def teacher_note(cls, cfg) -> str:
        if reference_kind(cfg) == "teacher":
            return "the teacher's samples are the FID reference here (0 by construction)"
        return super().teacher_note(cfg)

    @classmethod
    def details(cls, cfg) -> str:
        return f"features: {FEATURES[cfg.evaluate.features]}; reference: {REFERENCES[reference_kind(cfg)]}"

    def __init__(self, ctx: EvalContext):
        super().__init__(ctx)
        self.space = feature_space(ctx.cfg.evaluate.features, ctx.device, ctx.classifier(),
                                   ctx.cfg.evaluate.inception_path)
        self.reference: dict[str, np.ndarray] = {}

    def _features(self, images: torch.Tensor, key: str) -> np.ndarray:
        """Features of images written as PNGs to a scratch folder that lives only while clean-fid reads it."""
        tmp = temp_name(self.ctx.root / ".tmp" / key)
        try:
            return folder_features(write_png_folder(images, tmp), self.space, self.ctx.device,
                                   self.ctx.cfg.evaluate.batch_size)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def score(self, samples: Samples) -> float | None:
        ref = self._reference_features(samples)
        if ref is None:
            return None
        return fid_from_features(self._features(samples.images, samples.key), ref)

    def _reference_features(self, samples: Samples) -> np.ndarray | None:
        """Features of the FID reference, extracted once per process (the real digits' also once per run).

        None for the teacher when the reference is the teacher's own samples (FID 0 by construction)."""
        cfg, ctx = self.ctx.cfg, self.ctx
        kind = reference_kind(cfg)
        if kind == "teacher" and samples.kind == "teacher":
            return None
        key = f"teacher_seed{samples.seed}" if kind == "teacher" else kind
        if key in self.reference:
            return self.reference[key]
        cache = ctx.root / "reference" / f"digits_{self.space.name}_features.npy"
        if kind == "digits" and cache.is_file():
            feats = np.load(cache)
        elif kind == "teacher":
            x = ctx.teacher_outputs(samples.seed, samples.noise_seeds).to(ctx.device)
            feats = self._features(ctx.teacher.decode(x).float().cpu(), key)
        else:
            folder = Path(cfg.evaluate.reference).expanduser() if kind == "folder" else digits_reference_dir(cfg)
            feats = folder_features(folder, self.space, ctx.device, cfg.evaluate.batch_size)
            if kind == "digits":
                buf = io.BytesIO()
                np.save(buf, feats)
                atomic_write_bytes(cache, buf.getvalue())
        self.reference[key] = feats
        return feats
