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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UserError

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


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> [N, H, W, C] uint8 (round to nearest, as torchvision.save_image does)."""
    x = images01.detach().float().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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
    """clean-fid's FID of two feature sets (`fid_from_feats`: Gaussian fit, then eq. 6).

    This is what `cleanfid.fid.compute_fid(fdir1, fdir2)` does after reading both folders; calling its two
    halves lets a run extract the reference folder's features once instead of once per (checkpoint, NFE, seed).
    """
    from cleanfid import fid as cleanfid

    return float(cleanfid.fid_from_feats(np.asarray(generated, np.float64), np.asarray(reference, np.float64)))
