"""Metrics: PSNR and the SSIM family now (``image``); FID/KID/CMMD and segmentation metrics later.

Names are re-exported lazily so that importing one metrics module (e.g. a future feature-based one)
does not pull in MONAI through this package.
"""

from __future__ import annotations

import importlib

_IMAGE = ("psnr", "ssim", "msssim", "msssim_2d", "msssim_slices", "msssim_3d", "msssim_weights", "msssim_params")
__all__ = list(_IMAGE)


def __getattr__(name: str):
    if name in _IMAGE:
        return getattr(importlib.import_module(".image", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
