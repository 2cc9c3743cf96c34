"""Segmentation metrics on binary masks (numpy/scipy; no torch).

Every function takes a prediction and a ground truth of one shape (2-D ``(H, W)`` or 3-D
``(D, H, W)``) that are already binary. Soft model outputs (sigmoid maps) must go through
:func:`binarise` first; :func:`scores` refuses anything that is not {0, 1}, so a metric of an
unthresholded map cannot be produced by mistake.

Names (each clearly one thing):

* ``dice`` / ``iou`` / ``precision`` / ``recall`` — conventional voxel scores of one case.
  Conventions for empty masks: both empty → dice = iou = 1; precision with no predicted voxel and
  recall with no true voxel are undefined (NaN, left out of means).
* ``dice_pooled`` — one voxel Dice over all cases' voxels together (what a pooled sum gives).
* ``hd95`` — the symmetric 95th-percentile Hausdorff distance between mask *surfaces* (voxels that
  face-erosion removes), in mm with ``spacing`` (in the array's axis order), or in voxels with
  spacing 1. As MONAI ``compute_hausdorff_distance(percentile=95)``: percentiles of the distances
  pred→gt and gt→pred (linear interpolation), the larger of the two. NaN when either mask is empty
  (the reference skipped such cases).
* ``lesion_dice`` — the reference's "Dice" (SYSTEM.md §7): for each face-connected GT component
  ``G_k``, ``(2|P∩G_k| + 1) / (|P∩G_k| + |G_k| + 1)`` — computed inside the component's
  footprint, so false positives elsewhere are ignored (a per-lesion recall). Averaged over lesions,
  overall and per RANO-BM class; a lesion's class comes from the 2-D Feret diameter of its largest
  axial cross-section (in-plane spacing).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

THRESHOLD = 0.5
PERCENTILE = 95.0


def binarise(arr, threshold: float = THRESHOLD) -> tuple[np.ndarray, bool]:
    """(bool mask, was_soft): values in {0, 1} pass through; anything else is thresholded ``> t``."""
    a = np.asarray(arr)
    if a.dtype == bool:
        return a, False
    if not np.all(np.isfinite(a)):
        raise InputError("mask has NaN/Inf values", hint="fix the model output before evaluating")
    soft = bool(np.any((a != 0) & (a != 1)))
    return a > threshold, soft


def _require_binary(a: np.ndarray, which: str) -> np.ndarray:
    if a.dtype == bool:
        return a
    if np.any((a != 0) & (a != 1)):
        raise InputError(f"{which} is not binary (values other than 0 and 1)",
                         hint="threshold soft outputs first (medgen eval seg does, at --threshold 0.5)")
    return a.astype(bool)


def _edges(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return m & ~ndimage.binary_erosion(m)


def hd95(pred, gt, spacing=None, percentile: float = PERCENTILE) -> float:
    """Symmetric percentile Hausdorff distance between surfaces (module docstring)."""
    from scipy.spatial import cKDTree

    p, g = _require_binary(np.asarray(pred), "prediction"), _require_binary(np.asarray(gt), "ground truth")
    if not p.any() or not g.any():
        return float("nan")
    union = p | g
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in np.nonzero(union))
    scale = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    pc = np.argwhere(_edges(p[box])).astype(np.float64) * scale
    gc = np.argwhere(_edges(g[box])).astype(np.float64) * scale
    d_pg = cKDTree(gc, leafsize=32).query(pc, k=1)[0]
    d_gp = cKDTree(pc, leafsize=32).query(gc, k=1)[0]
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def voxel_scores(pred, gt) -> dict[str, float]:
    p, g = _require_binary(np.asarray(pred), "prediction"), _require_binary(np.asarray(gt), "ground truth")
    tp = float(np.count_nonzero(p & g))
    fp = float(np.count_nonzero(p & ~g))
    fn = float(np.count_nonzero(~p & g))
    nan = float("nan")
    both_empty = tp + fp + fn == 0
    return {"dice": 1.0 if both_empty else 2 * tp / (2 * tp + fp + fn),
            "iou": 1.0 if both_empty else tp / (tp + fp + fn),
            "precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan,
            "tp": tp, "fp": fp, "fn": fn}


def lesion_diameter_2d(component: np.ndarray, inplane_spacing) -> float:
    """Feret diameter (mm) of the largest axial cross-section of a 3-D component (D, H, W)."""
    from ..data.sizebins import feret_diameter

    if component.ndim == 2:
        return feret_diameter(np.argwhere(component), inplane_spacing)
    areas = component.reshape(component.shape[0], -1).sum(1)
    return feret_diameter(np.argwhere(component[int(areas.argmax())]), inplane_spacing)


def lesion_dice(pred, gt, spacing) -> list[tuple[float, str]]:
    """(dice, RANO-BM class) of every GT lesion (module docstring); ``spacing`` in array order."""
    from scipy import ndimage

    from ..data.sizebins import label_components, rano_class

    p, g = _require_binary(np.asarray(pred), "prediction"), _require_binary(np.asarray(gt), "ground truth")
    labels, n = label_components(g)
    inplane = tuple(spacing)[-2:]
    out = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[box] == k
        inter = float(np.count_nonzero(p[box] & comp))
        size = float(np.count_nonzero(comp))
        out.append(((2 * inter + 1) / (inter + size + 1), rano_class(lesion_diameter_2d(comp, inplane))))
    return out


def scores(pred, gt, spacing, hd_in_voxels: bool = False) -> dict:
    """All per-case scores of one binary pair."""
    out = voxel_scores(pred, gt)
    out["hd95"] = hd95(pred, gt, None if hd_in_voxels else spacing)
    out["lesions"] = lesion_dice(pred, gt, spacing)
    return out


def summarise(cases: list[dict]) -> dict[str, tuple[float, int]]:
    """name → (value, n) over cases: means of per-case scores (NaNs left out), pooled voxel Dice,
    and lesion Dice overall / per RANO-BM class (n = lesions)."""
    from ..data.sizebins import RANO_CLASSES

    res: dict[str, tuple[float, int]] = {}
    for key in ("dice", "iou", "precision", "recall", "hd95"):
        v = np.array([c[key] for c in cases], dtype=np.float64)
        ok = v[np.isfinite(v)]
        res[key] = (float(ok.mean()) if ok.size else float("nan"), int(ok.size))
    tp, fp, fn = (sum(c[k] for c in cases) for k in ("tp", "fp", "fn"))
    res["dice_pooled"] = (2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0, len(cases))
    lesions = [les for c in cases for les in c["lesions"]]
    res["lesion_dice"] = (float(np.mean([d for d, _ in lesions])) if lesions else float("nan"), len(lesions))
    for cls in RANO_CLASSES:
        vals = [d for d, c in lesions if c == cls]
        res[f"lesion_dice_{cls}"] = (float(np.mean(vals)) if vals else float("nan"), len(vals))
    return res
