"""Reading and writing NIfTI volumes (nibabel), with the checks CONTRACTS.md asks for.

Arrays stay in the on-disk order ``(H, W, D)`` = ``(x, y, z)`` here; callers that want medgen's
in-memory ``(D, H, W)`` transpose with ``to_dhw`` / ``from_dhw``. Spacing is ``(x, y, z)`` in mm,
taken from the header.

Masks: a mask holding 0 and one positive value (e.g. {0, 255}) is binarised (> 0) with a one-line
notice naming the file; more than two values, negative values or NaN are an ``InputError``.
Every write goes to a temporary file in the target folder and is renamed into place.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("medgen")

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def to_dhw(a: np.ndarray) -> np.ndarray:
    """(H, W, D) on disk → (D, H, W) in memory."""
    return np.transpose(a, (2, 0, 1))


def from_dhw(a: np.ndarray) -> np.ndarray:
    """(D, H, W) in memory → (H, W, D) on disk."""
    return np.transpose(a, (1, 2, 0))


def affine_from_spacing(spacing) -> np.ndarray:
    """A diagonal 4×4 affine for voxel spacing ``(x, y, z)`` mm."""
    sx, sy, sz = (float(s) for s in spacing)
    return np.diag([sx, sy, sz, 1.0])


def load_header(path):
    """The nibabel image object (header read, data not yet); InputError when missing/unreadable."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", where=path, hint="check the path; run 'medgen data check ROOT'")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for a bad file
        raise InputError(f"not a readable NIfTI file: {type(exc).__name__}: {exc}", where=path,
                         hint="re-export the volume as .nii.gz") from exc


def spacing_of(img) -> tuple[float, float, float]:
    """(x, y, z) voxel size in mm from a loaded header (a 2-D file gets z = 1.0)."""
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return tuple((zooms + [1.0, 1.0, 1.0])[:3])


def _data(img, path) -> np.ndarray:
    """The voxel array as float32, (H, W, D) or a 2-D slice (H, W); trailing singleton dims dropped."""
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise InputError(f"cannot read voxel data: {exc}", where=path,
                         hint="the file may be truncated; re-export it") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(f"expected a 3-D volume or a 2-D slice, found shape {arr.shape}", where=path,
                         hint="medgen reads one (H, W, D) volume or (H, W) slice per file")
    return arr


def require_volume(arr: np.ndarray, path) -> np.ndarray:
    """``arr`` if it is 3-D (H, W, D), else an InputError naming the file."""
    if arr.ndim != 3:
        raise InputError(f"expected a 3-D volume, found shape {arr.shape}", where=path,
                         hint="a dataset holds one (H, W, D) volume per modality file")
    return arr


def nonfinite_count(arr: np.ndarray) -> int:
    """How many voxels are NaN or ±Inf."""
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def read_image(path):
    """Read an image → (float32 array (H, W, D) or (H, W), spacing (x, y, z) mm, affine 4×4)."""
    img = load_header(path)
    arr = _data(img, path)  # (H, W, D) | (H, W)
    bad = nonfinite_count(arr)
    if bad:
        raise InputError(f"volume has {bad} NaN/Inf voxels", where=path,
                         hint="fix or re-export the file; medgen does not guess missing values")
    return arr, spacing_of(img), np.asarray(img.affine, dtype=np.float64)


def mask_problem(arr: np.ndarray):
    """Classify a mask's values: None (already {0,1}), ("notice", text) or ("error", text)."""
    if nonfinite_count(arr):
        return "error", f"mask has {nonfinite_count(arr)} NaN/Inf voxels"
    values = np.unique(arr)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    if values.size and values[0] < 0:
        return "error", f"mask has negative values ({shown})"
    if values.size > 2:
        return "error", f"mask has {values.size} distinct values ({shown}); expected 0 and 1"
    if values.size == 2 and (values[0] != 0 or values[1] != 1):
        if values[0] != 0:
            return "error", f"mask values are ({shown}); expected 0 and 1"
        return "notice", f"mask values are {{{shown}}}; binarised (> 0)"
    return None


def read_mask(path) -> np.ndarray:
    """Read a binary mask → uint8 {0, 1} array (H, W, D) or (H, W); rules in the module docstring."""
    arr = _data(load_header(path), path)  # (H, W, D) | (H, W)
    problem = mask_problem(arr)
    if problem and problem[0] == "error":
        raise InputError(problem[1], where=path,
                         hint="a mask must hold 0 (background) and one positive value (tumour)")
    if problem:
        log.warning("notice: %s (%s)", problem[1], path)
    return (arr > 0).astype(np.uint8)


def _tmp_name(path: Path) -> Path:
    """A hidden temporary name in the same folder that keeps the NIfTI suffix (gzip is chosen by it)."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")


def write_nifti(path, array, spacing=None, affine=None, *, mask: bool | None = None) -> Path:
    """Write ``array`` (H, W, D) or a 2-D slice (H, W) atomically; masks uint8, images float32.

    ``mask`` None infers from the dtype (bool/integer = mask). ``affine`` takes precedence over
    ``spacing``; with neither the affine is the identity. Use a ``.nii.gz`` name for gzip.
    """
    import nibabel as nib

    path = Path(path)
    arr = np.asarray(array)
    is_mask = mask if mask is not None else (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer))
    arr = (arr > 0).astype(np.uint8) if is_mask else arr.astype(np.float32)
    if affine is None:
        affine = affine_from_spacing(spacing if spacing is not None else (1.0, 1.0, 1.0))
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def find_modality(patient_dir, modality: str) -> Path | None:
    """``<patient>/<modality>.nii.gz`` (or ``.nii``) if present, else None."""
    for suffix in NIFTI_SUFFIXES:
        p = Path(patient_dir) / f"{modality}{suffix}"
        if p.is_file():
            return p
    return None
