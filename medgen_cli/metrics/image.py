"""Reconstruction metrics on images in [0, 1]: PSNR and the SSIM family (SYSTEM.md §9).

All functions take ``gen`` and ``ref`` of one shape, channel-first — 2D ``(B, C, H, W)``, 3D
``(B, C, D, H, W)`` — clamp both to [0, 1] (data range 1) and return one value per sample, ``(B,)``,
float32 on the input's device. Averaging over samples is the caller's business.

SSIM and MS-SSIM are MONAI's ``SSIMMetric`` / ``MultiScaleSSIMMetric`` (Gaussian kernel 11,
σ 1.5, k1 0.01, k2 0.03); medgen only chooses their parameters.

Kernel/scale rule for MS-SSIM (:func:`msssim_params`). The number of scales follows the reference
by the smallest spatial side ``s``: ≥ 177 px five scales, ≥ 89 four, ≥ 45 three, else two. With fewer
than five scales the weights are the *first* k standard weights (0.0448, 0.2856, 0.3001, 0.2363,
0.1333) renormalised to sum to 1, so the finest scales keep their relative importance and a perfect
match still scores exactly 1. MONAI refuses an image unless ``s // (k - 1)**2 > kernel - 1`` (k =
number of scales) and its valid convolution needs ``s // 2**(k - 1) >= kernel`` at the coarsest scale.
Kernel 11 meets both at the reference thresholds except for four scales on 89–98 px and two scales
below 22 px; there the kernel is reduced to the largest odd size that fits (σ stays 1.5, so the
Gaussian is truncated, slightly raising values). Below 6 px no 3-px kernel fits and MS-SSIM is refused.
"""

from __future__ import annotations

import torch

from ..errors import InputError

STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11
KERNEL_SIGMA = 1.5
PSNR_CAP_DB = 100.0
_SCALE_THRESHOLDS = ((177, 5), (89, 4), (45, 3))  # (min side, number of scales), else 2


# --------------------------------------------------------------------------- checks and helpers


def _check_pair(gen: torch.Tensor, ref: torch.Tensor, spatial_dims: int | None = None) -> None:
    """Same shape, and ``spatial_dims + 2`` axes when given; InputError saying observed vs expected."""
    if gen.shape != ref.shape:
        raise InputError(f"generated and reference shapes differ: {tuple(gen.shape)} vs {tuple(ref.shape)}",
                         hint="compare images of the same size (resize or crop one side first)")
    if spatial_dims is not None and gen.ndim != spatial_dims + 2:
        layout = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise InputError(f"expected a {spatial_dims}D batch {layout}, got shape {tuple(gen.shape)}",
                         hint="add the batch and channel axes, or pass the matching spatial_dims")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """float32 copy clamped to [0, 1] (the data range every metric here assumes)."""
    return x.detach().float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------- PSNR


def psnr(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB, ``10·log10(1 / MSE)`` on [0, 1], capped at 100 dB (MSE 0 → 100)."""
    _check_pair(gen, ref)
    mse = (_unit(gen) - _unit(ref)).pow(2).flatten(1).mean(1)  # (B,)
    db = 10.0 * torch.log10(1.0 / mse)  # +inf where mse == 0
    return db.clamp(max=PSNR_CAP_DB)


# --------------------------------------------------------------------------- MS-SSIM parameters


def msssim_weights(min_side: int) -> tuple[float, ...]:
    """Scale weights for an image whose smallest spatial side is ``min_side`` (module docstring)."""
    scales = next((n for side, n in _SCALE_THRESHOLDS if min_side >= side), 2)
    first = STANDARD_WEIGHTS[:scales]
    if scales == len(STANDARD_WEIGHTS):
        return first
    total = sum(first)
    return tuple(w / total for w in first)


def _fits(min_side: int, scales: int, kernel: int) -> bool:
    """True when MONAI accepts ``kernel`` for ``scales`` and the coarsest valid convolution fits."""
    monai_ok = min_side // max(1, scales - 1) ** 2 > kernel - 1
    return monai_ok and (min_side >> (scales - 1)) >= kernel


def msssim_params(min_side: int) -> tuple[tuple[float, ...], int]:
    """``(weights, kernel_size)`` for MS-SSIM at ``min_side`` px (the kernel/scale rule above)."""
    weights = msssim_weights(min_side)
    kernel = next((k for k in range(KERNEL_SIZE, 2, -2) if _fits(min_side, len(weights), k)), None)
    if kernel is None:
        raise InputError(f"image too small for MS-SSIM: smallest side {min_side} px, need at least 6 px",
                         hint="use psnr/ssim for such small images")
    return weights, kernel


# --------------------------------------------------------------------------- SSIM family (MONAI)


def _ms_ssim_raw(gen: torch.Tensor, ref: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """MONAI MultiScaleSSIMMetric on already-clamped inputs; ``(B,)``."""
    from monai.metrics import MultiScaleSSIMMetric

    weights, kernel = msssim_params(min(gen.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=1.0, kernel_size=kernel,
                                  kernel_sigma=KERNEL_SIGMA, weights=weights)
    return metric(gen, ref).reshape(-1)  # (B, 1) → (B,)


def msssim_2d(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """2D MS-SSIM of ``(B, C, H, W)`` images, per image ``(B,)``."""
    _check_pair(gen, ref, 2)
    return _ms_ssim_raw(_unit(gen), _unit(ref), 2)


def _axial_slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` → ``(B·D, C, H, W)``, volume-major (slices of volume 0 first)."""
    b, c, d, h, w = x.shape
    return x.transpose(1, 2).reshape(b * d, c, h, w)


def msssim_slices(gen: torch.Tensor, ref: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """2D MS-SSIM over the axial slices (D axis) of ``(B, C, D, H, W)`` volumes, averaged per volume.

    Slices are scored ``chunk`` at a time to bound memory; the result does not depend on ``chunk``.
    """
    _check_pair(gen, ref, 3)
    b, d = gen.shape[0], gen.shape[2]
    g, r = _axial_slices(_unit(gen)), _axial_slices(_unit(ref))  # (B·D, C, H, W)
    scores = torch.cat([_ms_ssim_raw(g[i:i + chunk], r[i:i + chunk], 2) for i in range(0, b * d, chunk)])
    return scores.reshape(b, d).mean(1)  # (B,)


def msssim_3d(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Volumetric MS-SSIM of ``(B, C, D, H, W)`` (MONAI, 3D kernel), the reference's "MS-SSIM-3D"."""
    _check_pair(gen, ref, 3)
    return _ms_ssim_raw(_unit(gen), _unit(ref), 3)


def msssim(gen: torch.Tensor, ref: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """MS-SSIM as the reference reports it: 2D per image; for 3D the mean over axial slices.

    The reference's 3D "MS-SSIM" is slice-wise (:func:`msssim_slices`); its "MS-SSIM-3D" is
    :func:`msssim_3d`.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return msssim_2d(gen, ref) if spatial_dims == 2 else msssim_slices(gen, ref)


def ssim(gen: torch.Tensor, ref: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """SSIM per sample ``(B,)``: MONAI SSIMMetric, Gaussian kernel 11 (smaller, odd, when a side is
    below 11 px), data range 1. For 3D this is the volumetric SSIM."""
    from monai.metrics import SSIMMetric

    _check_pair(gen, ref, spatial_dims)
    side = min(gen.shape[2:])
    kernel = min(KERNEL_SIZE, side if side % 2 else side - 1)
    if kernel < 3:
        raise InputError(f"image too small for SSIM: smallest side {side} px, need at least 3 px")
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=kernel, kernel_sigma=KERNEL_SIGMA)
    return metric(_unit(gen), _unit(ref)).reshape(-1)
