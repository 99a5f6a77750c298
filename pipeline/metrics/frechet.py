"""Frechet distance between two feature sets (FID's formula, Heusel et al. 2017, eq. 6)."""
from __future__ import annotations

import numpy as np


def sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, on every scipy: newer releases dropped sqrtm's `disp` argument (a call with
    disp=False, as clean-fid's, is a TypeError there: seen on the H100 image) and return the matrix alone."""
    from scipy import linalg      # here, not at module level: `flowsteer status` need not pay for scipy

    out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})."""
    diff = mu1 - mu2
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        off = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + off) @ (sigma2 + off))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_from_features(feats_a, feats_b) -> float:
    """Frechet distance between the Gaussians fitted to two [N, D] feature arrays."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))
