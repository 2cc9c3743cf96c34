"""Brain atlas of a training split and the validity checks of generated tumour masks (SYSTEM.md §8).

Atlas: for every patient of the split, the brain (head) region is ``bravo > threshold`` after min–max
normalisation and the in-plane resize to ``size``, reduced to its largest connected component, holes
filled and dilated by 3 voxels (the reference's recipe); the atlas is the voxel-wise union over patients
(depth padded with zeros to the deepest patient). Stored as a uint8 NIfTI (H, W, D) with the first
patient's resized spacing. 2D models use its projection over depth (a pixel is inside if it is inside
on any slice).

Mask checks, in this order, on a binary mask (D, H, W) or (H, W):
1. empty → rejected ``empty``;
2. with an atlas: every tumour (face-connected component, as size bins count them) with less than half
   of its voxels inside the atlas is removed and the rest is clipped to the atlas; nothing left →
   rejected ``outside-atlas``;
3. any slice whose tumour fraction (tumour voxels / slice voxels) exceeds ``max_fraction`` → rejected
   ``too-large``.
No torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from . import layout, nifti

THRESHOLD = 0.05  # normalised bravo intensity above which a voxel counts as brain/head
INSIDE = 0.5  # a tumour is kept when at least this fraction of it lies inside the atlas


def brain_mask(vol: np.ndarray, threshold: float = THRESHOLD, dilate: int = 3) -> np.ndarray:
    """Largest component of vol > threshold, holes filled, dilated by `dilate` voxels (bool)."""
    from scipy import ndimage

    labels, n = ndimage.label(vol > threshold)
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    mask = ndimage.binary_fill_holes(labels == largest)
    return ndimage.binary_dilation(mask, iterations=dilate) if dilate else mask


def build_atlas(root, split: str = "train", size: int | None = None, threshold: float = THRESHOLD,
                normalization: str = "minmax") -> tuple[np.ndarray, tuple[float, float, float], int]:
    """(atlas (D, H, W) uint8, spacing (x, y, z) mm, number of patients) of ``root/split``."""
    from .datasets import load_modality, patient_spacing

    pats = layout.patients(Path(root), split)
    if not pats:
        raise InputError(f"split '{split}' has no patients", Path(root) / split, "build the atlas from a filled split")
    brains = []
    for p in pats:
        path = nifti.find_modality(p, "bravo")
        if path is None:
            raise InputError("missing bravo.nii.gz", p, "the atlas is built from the bravo images")
        brains.append(brain_mask(load_modality(path, "bravo", size), threshold))  # (D, H, W) bool
    depth = max(b.shape[0] for b in brains)
    atlas = np.zeros((depth,) + brains[0].shape[1:], dtype=bool)
    for b in brains:
        if b.shape[1:] != atlas.shape[1:]:
            raise InputError(f"in-plane sizes differ ({b.shape[1:]} vs {atlas.shape[1:]})", Path(root) / split,
                             "pass --size to resize every patient to one size")
        atlas[: b.shape[0]] |= b
    spacing = patient_spacing(pats[0], "bravo", size)
    return atlas.astype(np.uint8), spacing, len(pats)


def write_atlas(path, atlas: np.ndarray, spacing) -> Path:
    return nifti.write_nifti(path, nifti.from_dhw(atlas), spacing=spacing, mask=True)


def read_atlas(path, shape: tuple[int, ...]) -> np.ndarray:
    """The atlas at ``path`` as bool (D, H, W) trimmed/zero-padded to ``shape`` (D, H, W), or (H, W)
    (the projection over depth) for a 2-D ``shape``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"atlas not found: {path}", "--atlas", "build it with `medgen data atlas ROOT --size N`")
    a = nifti.to_dhw(nifti.require_volume(nifti.read_mask(path), path)) > 0  # (D, H, W)
    if a.shape[1:] != tuple(shape[-2:]):
        raise InputError(f"atlas is {a.shape[1]}x{a.shape[2]} in-plane, the model makes {shape[-2]}x{shape[-1]}",
                         str(path), f"rebuild it with `medgen data atlas ROOT --size {shape[-1]}`")
    if len(shape) == 2:
        return a.any(axis=0)
    out = np.zeros(shape, dtype=bool)
    d = min(shape[0], a.shape[0])
    out[:d] = a[:d]
    return out


def check_mask(mask: np.ndarray, atlas: np.ndarray | None, max_fraction: float) -> tuple[np.ndarray, str | None]:
    """(cleaned mask, None) when acceptable, else (mask, reason); see the module docstring."""
    from scipy import ndimage

    m = mask > 0
    if not m.any():
        return m, "empty"
    if atlas is not None:
        labels, n = ndimage.label(m)  # face connectivity (the default structure)
        ids = np.arange(1, n + 1)
        inside = ndimage.sum(atlas, labels, ids) / ndimage.sum(m, labels, ids)
        keep = ids[np.asarray(inside) >= INSIDE]
        m = np.isin(labels, keep) & atlas
        if not m.any():
            return m, "outside-atlas"
    slices = m[None] if m.ndim == 2 else m  # (D, H, W)
    frac = slices.reshape(slices.shape[0], -1).mean(axis=1)
    if float(frac.max()) > max_fraction:
        return m, "too-large"
    return m, None
