"""Online preprocessing of one volume: normalisation, in-plane resize, depth padding/trimming.

Volumes are ``(D, H, W)`` (depth first, as in memory). Normalisation follows SYSTEM.md §1:
``minmax`` scales each volume to [0, 1]; ``global_percentile`` clips to [0, clip_max] and divides by
the per-modality brain-only p99.5 (``PERCENTILE_CLIP``). The in-plane resize uses MONAI ``Resize``
with area interpolation for images *and* masks, as the reference does; masks are re-binarised with
``> 0.5``. MONAI/torch are imported only inside ``resize_inplane``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError

PERCENTILE_CLIP = {"bravo": 5898.0, "t1_pre": 1257.0, "t1_gd": 1353.0}
NORMALIZATIONS = ("minmax", "global_percentile")
PAD_MODES = ("replicate", "constant")
MASK_THRESHOLD = 0.5


def minmax(vol: np.ndarray) -> np.ndarray:
    """Scale one volume to [0, 1]; a constant volume becomes zeros."""
    vol = np.asarray(vol, dtype=np.float32)
    lo, hi = float(vol.min()), float(vol.max())
    if not hi > lo:
        return np.zeros_like(vol)
    return ((vol - lo) / (hi - lo)).astype(np.float32)


def global_percentile(vol: np.ndarray, clip_max: float) -> np.ndarray:
    """Clip to [0, clip_max] and divide by clip_max (one fixed scale per modality)."""
    if not clip_max > 0:
        raise UsageError(f"clip_max must be positive, got {clip_max}", where="normalization")
    return (np.clip(np.asarray(vol, dtype=np.float32), 0.0, clip_max) / np.float32(clip_max)).astype(np.float32)


def normalize(vol: np.ndarray, method: str, modality: str) -> np.ndarray:
    """Apply normalisation ``method`` to an image of ``modality``."""
    if method == "minmax":
        return minmax(vol)
    if method == "global_percentile":
        if modality not in PERCENTILE_CLIP:
            raise UsageError(f"no global_percentile clip value for modality '{modality}'",
                             where="normalization",
                             hint=f"known: {', '.join(PERCENTILE_CLIP)}; use normalization 'minmax'")
        return global_percentile(vol, PERCENTILE_CLIP[modality])
    raise UsageError(f"unknown normalization '{method}'", where="normalization",
                     hint=f"choose one of {', '.join(NORMALIZATIONS)}")


def _hw(size) -> tuple[int, int]:
    """An int or (h, w) → (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_inplane(vol: np.ndarray, size, is_mask: bool, mode: str = "area") -> np.ndarray:
    """Resize the H, W axes of ``vol`` (D, H, W) to ``size``; depth unchanged. float32 out.

    Identity when the size already matches. Masks are re-binarised with ``> 0.5`` afterwards.
    """
    vol = np.asarray(vol, dtype=np.float32)
    h, w = _hw(size)
    if vol.shape[-2:] == (h, w):
        out = vol.copy()
    else:
        import torch
        from monai.transforms import Resize

        resize = Resize(spatial_size=(h, w), mode=mode)  # depth acts as the channel axis
        out = resize(torch.from_numpy(np.ascontiguousarray(vol)))  # (D, h, w)
        out = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
    if is_mask:
        out = (out > MASK_THRESHOLD).astype(np.float32)
    return out


def resized_spacing(spacing, old_hw, new_size) -> tuple[float, float, float]:
    """(x, y, z) spacing after resizing H×W (x↔H, y↔W on disk) to ``new_size``."""
    sx, sy, sz = (float(s) for s in spacing)
    oh, ow = _hw(old_hw)
    nh, nw = _hw(new_size)
    return sx * oh / nh, sy * ow / nw, sz


def _depth_index(ndim: int, sl: slice) -> tuple:
    """Index that slices the depth axis, the third from last ((D,H,W), (C,D,H,W), (B,C,D,H,W))."""
    if ndim < 3:
        raise ValueError(f"expected an array with a depth axis (…, D, H, W), got {ndim} dims")
    return (Ellipsis, sl, slice(None), slice(None))


def pad_depth(vol: np.ndarray, target: int, mode: str = "replicate") -> np.ndarray:
    """Pad the depth axis (third from last) at its END to ``target`` slices.

    ``replicate`` repeats the last slice, ``constant`` adds zeros. A deeper volume is an error.
    """
    if mode not in PAD_MODES:
        raise UsageError(f"unknown pad mode '{mode}'", where="pad_mode", hint=f"choose one of {', '.join(PAD_MODES)}")
    vol = np.asarray(vol)
    depth = vol.shape[-3]
    if depth > target:
        raise ValueError(f"volume has {depth} slices, more than the padding target {target}")
    widths = [(0, 0)] * vol.ndim
    widths[vol.ndim - 3] = (0, target - depth)
    return np.pad(vol, widths, mode="edge" if mode == "replicate" else "constant")


def trim_depth(vol, depth: int):
    """Keep the first ``depth`` slices of the depth axis (third from last); numpy or torch."""
    if depth > vol.shape[-3]:
        raise ValueError(f"cannot trim {vol.shape[-3]} slices to {depth}")
    return vol[_depth_index(vol.ndim, slice(0, depth))]
