"""Distribution metrics on feature matrices: FID, KID and CMMD, each in two named protocols.

Inputs are feature matrices ``(N, d)`` (numpy or torch, any float type); every computation runs in
float64. Nothing here reads files or knows about networks (see ``features``).

Protocols (the name goes into every metric record):

* ``fid`` — one definition: the Fréchet distance between Gaussian fits,
  ``|μ₁−μ₂|² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁Σ₂)^½`` with unbiased covariances (N−1). The trace of the
  matrix square root is computed as ``Σ √λᵢ`` of the symmetric PSD matrix ``Σ₁^½ Σ₂ Σ₁^½`` (two
  symmetric eigendecompositions; the same eigenvalues as Σ₁Σ₂, so it equals scipy's
  ``real(trace(sqrtm(Σ₁Σ₂)))`` the reference used, without its cost or its complex round-off).
* ``kid`` — unbiased MMD² with the kernel ``k(x, y) = (xᵀy/d + 1)³``, averaged over random subsets.
  ``reference``: 50 subsets of ``min(100, n_gen, n_ref)`` (SYSTEM.md §9); ``standard``: 100 subsets
  of ``min(1000, n_gen, n_ref)`` (Bińkowski et al. 2018; torchmetrics' defaults). Value = mean,
  ``std`` = standard deviation over subsets.
* ``cmmd`` — features L2-normalised, RBF kernel ``exp(−|x−y|²/(2σ²))``.
  ``reference``: at most 10,000 rows per side (random subset), σ = median pairwise distance among
  at most 500 + 500 pooled rows (floored at 0.1), unbiased MMD², value ``√max(MMD², 0)``;
  ``standard``: σ = 10, biased MMD² (diagonals included), value ``1000 × MMD²``
  (Jayasumana et al. 2024). The two are not comparable with each other.

Random subsets use ``numpy.random.default_rng(seed)``; the seed is recorded with the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROTOCOLS = ("reference", "standard")
KID_SUBSETS = {"reference": (50, 100), "standard": (100, 1000)}  # (number of subsets, subset size cap)
CMMD_MAX_ROWS = 10_000
CMMD_BANDWIDTH_ROWS = 500
CMMD_MIN_SIGMA = 0.1
CMMD_STANDARD_SIGMA = 10.0
CMMD_STANDARD_SCALE = 1000.0


@dataclass
class Value:
    """One metric value with what produced it (``detail`` is free-form: std, subsets, sigma...)."""

    value: float
    protocol: str
    detail: dict = field(default_factory=dict)


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix (N, d), got shape {x.shape}")
    return x


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


# --------------------------------------------------------------------------- FID


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), unbiased covariance (d, d)) in float64."""
    x = _f64(feats)
    if len(x) < 2:
        raise ValueError("FID needs at least 2 feature rows per side")
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(mu1, s1, mu2, s2) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2) (module docstring)."""
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid(gen, ref, device=None) -> Value:
    """FID; with ``device`` (e.g. "cuda") the same float64 computation runs there in torch (the two
    2048×2048 eigendecompositions take seconds on a few CPU cores, milliseconds on a GPU)."""
    if device is not None:
        return Value(frechet_torch(gen, ref, device), "fid")
    mu1, s1 = gaussian_stats(gen)
    mu2, s2 = gaussian_stats(ref)
    return Value(frechet_from_stats(mu1, s1, mu2, s2), "fid")


def frechet_torch(gen, ref, device) -> float:
    """``frechet_from_stats(gaussian_stats(gen), gaussian_stats(ref))`` in torch float64 on ``device``."""
    import torch

    def stats(x):
        x = torch.as_tensor(np.asarray(x) if not hasattr(x, "detach") else x).to(device, torch.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError("FID needs a 2-D feature matrix with at least 2 rows per side")
        mu = x.mean(0)
        xc = x - mu
        return mu, xc.T @ xc / (len(x) - 1)

    mu1, s1 = stats(gen)
    mu2, s2 = stats(ref)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)


# --------------------------------------------------------------------------- KID


def poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (xᵀy/d + 1)³; x (m, d), y (n, d)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(gen, ref, protocol: str = "reference", seed: int = 0, subsets: int | None = None,
        subset_size: int | None = None) -> Value:
    """KID (module docstring); ``subsets``/``subset_size`` override the protocol's numbers."""
    _check_protocol(protocol)
    x, y = _f64(gen), _f64(ref)
    n_sub, cap = KID_SUBSETS[protocol]
    n_sub = subsets or n_sub
    size = min(subset_size or cap, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 feature rows per side")
    rng = np.random.default_rng(seed)
    vals = np.array([poly_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                        y[rng.choice(len(y), size, replace=False)]) for _ in range(n_sub)])
    return Value(float(vals.mean()), protocol, {"std": float(vals.std()), "subsets": n_sub, "subset_size": size})


# --------------------------------------------------------------------------- CMMD


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.clip(d, 0, None)


def median_bandwidth(x: np.ndarray, y: np.ndarray, rng) -> float:
    """Median pairwise distance (off-diagonal) among ≤ 500 + 500 pooled rows, floored at 0.1."""
    xs = x[rng.choice(len(x), min(len(x), CMMD_BANDWIDTH_ROWS), replace=False)]
    ys = y[rng.choice(len(y), min(len(y), CMMD_BANDWIDTH_ROWS), replace=False)]
    z = np.concatenate([xs, ys])
    d = np.sqrt(_sqdist(z, z))
    iu = np.triu_indices(len(z), k=1)
    return max(float(np.median(d[iu])), CMMD_MIN_SIGMA)


def rbf_mmd2(x: np.ndarray, y: np.ndarray, sigma: float, unbiased: bool) -> float:
    g = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = (np.exp(-g * _sqdist(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    if not unbiased:
        return float(kxx.mean() + kyy.mean() - 2.0 * kxy.mean())
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def cmmd(gen, ref, protocol: str = "reference", seed: int = 0) -> Value:
    _check_protocol(protocol)
    x, y = _l2n(_f64(gen)), _l2n(_f64(ref))
    if protocol == "standard":
        return Value(CMMD_STANDARD_SCALE * rbf_mmd2(x, y, CMMD_STANDARD_SIGMA, unbiased=False), protocol,
                     {"sigma": CMMD_STANDARD_SIGMA, "scale": CMMD_STANDARD_SCALE, "estimator": "biased"})
    rng = np.random.default_rng(seed)
    if len(x) > CMMD_MAX_ROWS:
        x = x[rng.choice(len(x), CMMD_MAX_ROWS, replace=False)]
    if len(y) > CMMD_MAX_ROWS:
        y = y[rng.choice(len(y), CMMD_MAX_ROWS, replace=False)]
    sigma = median_bandwidth(x, y, rng)
    mmd2 = rbf_mmd2(x, y, sigma, unbiased=True)
    return Value(float(np.sqrt(max(mmd2, 0.0))), protocol,
                 {"sigma": sigma, "mmd2": mmd2, "estimator": "unbiased, sqrt"})


# --------------------------------------------------------------------------- dispatch


def compute(name: str, gen, ref, protocol: str = "reference", seed: int = 0, device=None) -> Value:
    """``name`` in fid | kid | cmmd (``device``: where FID's linear algebra runs; None = numpy)."""
    if name == "fid":
        return fid(gen, ref, device)
    if name == "kid":
        return kid(gen, ref, protocol, seed)
    if name == "cmmd":
        return cmmd(gen, ref, protocol, seed)
    raise ValueError(f"unknown distribution metric {name!r}")
