"""FID and KID from feature arrays (float64 NumPy): Heusel et al. (2017) and Bińkowski et al. (2018).

Notation: μ (`mu`), Σ (`sigma`) are the mean and covariance of the (N, D) feature rows; FID = d², the squared
Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2); KID is the unbiased MMD² under a cubic polynomial kernel.
"""
import warnings

import numpy as np
from scipy import linalg

from carrara.errors import CarraraError


def _check_features(features: np.ndarray, what: str) -> np.ndarray:
    """(N, D) float64 features, or a one-line CarraraError saying what is wrong."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise CarraraError(f"{what} features must be a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise CarraraError(f"{what} features need at least 2 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise CarraraError(f"{what} features contain NaN or infinite values")
    return x


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features in float64, as pytorch-fid's `calculate_activation_statistics`."""
    x = _check_features(features, "the")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) of two Gaussians (Heusel et al. 2017, FID).

    Follows pytorch-fid's `calculate_frechet_distance` (Dougal Sutherland's stable version): when sqrtm of the
    (possibly singular) product Σ1Σ2 is not finite, eps·I is added to both covariances and the root retaken; a
    negligible imaginary part left by sqrtm is dropped, a large one (diagonal beyond 1e-3) is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))  # (D,)
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))  # (D, D)
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))  # (D, D)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise CarraraError(f"FID statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                           f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise CarraraError(f"FID statistic {name} contains NaN or infinite values")
    diff = mu1 - mu2  # (D,)

    covmean = linalg.sqrtm(sigma1 @ sigma2)  # (Σ1Σ2)^½, (D, D), may be complex
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise CarraraError("FID: sqrtm(Σ1Σ2) is not finite even with eps added; the feature statistics are degenerate")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise CarraraError(f"FID: sqrtm(Σ1Σ2) has a large imaginary component "
                               f"({np.max(np.abs(covmean.imag)):.3g}); the feature statistics are degenerate")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (γ x·y + coef)^degree with γ = 1/D by default (Bińkowski et al. 2018, KID): (M, D), (M, D) → (M, M)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD² from the (M, M) kernel matrices (Gretton et al. 2012, Lemma 6), as torchmetrics' KID."""
    m = k_xx.shape[0]
    kt_xx = k_xx.sum() - np.trace(k_xx)  # Σ_{i≠j} k(x_i, x_j)
    kt_yy = k_yy.sum() - np.trace(k_yy)
    return float((kt_xx + kt_yy) / (m * (m - 1)) - 2 * k_xy.sum() / m**2)


def kid(features_real: np.ndarray, features_fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): mean and std of the unbiased MMD² over random subsets.

    Matches torchmetrics' `KernelInceptionDistance.compute` (std over subsets with ddof=0). Subset i draws, with
    `rng = np.random.default_rng(seed)`, `rng.choice(n_real, m, replace=False)` then `rng.choice(n_fake, m,
    replace=False)`, where m = min(subset_size, n_real, n_fake).
    """
    x = _check_features(features_real, "real")  # (N_real, D)
    y = _check_features(features_fake, "generated")  # (N_fake, D)
    if x.shape[1] != y.shape[1]:
        raise CarraraError(f"KID: real and generated features differ in dimension ({x.shape[1]} vs {y.shape[1]})")
    if subsets < 1 or subset_size < 2:
        raise CarraraError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < subset_size:
        warnings.warn(f"KID: subset_size {subset_size} is larger than the sample count "
                      f"(real {x.shape[0]}, generated {y.shape[0]}); using subset_size {m}")
    rng = np.random.default_rng(seed)
    k = {"degree": degree, "gamma": gamma, "coef": coef}
    scores = np.empty(subsets)  # (subsets,)
    for i in range(subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]  # (m, D)
        ys = y[rng.choice(y.shape[0], m, replace=False)]  # (m, D)
        scores[i] = mmd2_unbiased(polynomial_kernel(xs, xs, **k), polynomial_kernel(xs, ys, **k),
                                  polynomial_kernel(ys, ys, **k))
    return float(scores.mean()), float(scores.std())
