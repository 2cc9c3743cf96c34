"""Patients, 2D slices and 3D volumes as torch datasets (the only torch import of ``data``).

``load_patient`` reads a patient's modalities as ``(D, H, W)`` float32: images normalised to [0, 1]
and resized in-plane, ``seg`` binary {0, 1}; optionally padded in depth. The work per file goes
through the volume cache (``cache.py``).

Modes: ``bravo`` → image = bravo (1 channel), cond = seg (1 channel); ``seg`` → image = seg, no
condition (a zero-channel tensor). An item is ``{"image": (C, H, W) | (C, D, H, W) float32,
"cond": (C', …) float32, "patient": str, "slice": int (-1 for volumes)}``.

2D slice rules (SYSTEM.md §1): slices are axial (the D axis in memory); a slice is kept only when
every image channel sums to more than 1.0 (on [0, 1] data); ``seg`` mode keeps only slices with at
least 10 tumour pixels. Empty-tumour slices are kept in ``bravo`` mode. Order: sorted patients,
increasing slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError, UsageError, did_you_mean
from . import cache, layout, nifti, preprocess

MODES = {"bravo": ("bravo", "seg"), "seg": ("seg",)}  # mode → modalities it reads
SLICE_MIN_SUM = 1.0  # an image channel must sum to more than this to keep a slice
SEG_MIN_PIXELS = 10  # seg mode: tumour pixels needed to keep a slice


def _modality_path(patient_dir: Path, modality: str) -> Path:
    path = nifti.find_modality(patient_dir, modality)
    if path is None:
        raise InputError(f"missing modality file '{modality}.nii.gz'", where=patient_dir / f"{modality}.nii.gz",
                         hint="run 'medgen data check ROOT' to list every problem")
    return path


def _load_modality(path: Path, modality: str, image_size, normalization: str) -> np.ndarray:
    """Read, normalise and resize one file → (D, H, W) float32."""
    if modality == "seg":
        vol = nifti.to_dhw(nifti.require_volume(nifti.read_mask(path), path)).astype(np.float32)  # (D, H, W)
    else:
        raw = nifti.require_volume(nifti.read_image(path)[0], path)  # (H, W, D)
        vol = preprocess.normalize(nifti.to_dhw(raw), normalization, modality)  # (D, H, W) [0, 1]
    if image_size is not None:
        vol = preprocess.resize_inplane(vol, image_size, is_mask=(modality == "seg"))
    return np.ascontiguousarray(vol, dtype=np.float32)


def load_modality(path, modality: str, image_size=None, normalization: str = "minmax", cache_dir=None) -> np.ndarray:
    """One preprocessed modality (D, H, W) float32, through the cache."""
    params = {"modality": modality, "image_size": image_size,
              "normalization": None if modality == "seg" else normalization}
    return cache.cached(path, params, lambda: _load_modality(Path(path), modality, image_size, normalization),
                        cache_dir)


def load_patient(patient_dir, modalities, image_size=None, normalization: str = "minmax",
                 pad_depth_to: int | None = None, pad_mode: str = "replicate", cache_dir=None) -> dict:
    """{modality: (D, H, W) float32} for one patient; every modality must share one shape.

    ``image_size`` None keeps the native in-plane size. ``pad_depth_to`` pads depth at the end
    (``replicate`` or ``constant``); a deeper volume is an ``InputError``.
    """
    patient_dir = Path(patient_dir)
    out = {m: load_modality(_modality_path(patient_dir, m), m, image_size, normalization, cache_dir)
           for m in modalities}
    shapes = {m: v.shape for m, v in out.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"modalities have different shapes: {shapes}", where=patient_dir,
                         hint="run 'medgen data check ROOT'; every modality must share one grid")
    if pad_depth_to:
        out = {m: _pad(v, pad_depth_to, pad_mode, patient_dir) for m, v in out.items()}
    return out


def _pad(vol: np.ndarray, target: int, mode: str, patient_dir: Path) -> np.ndarray:
    if vol.shape[0] > target:
        raise InputError(f"volume has {vol.shape[0]} slices, more than pad_depth_to={target}",
                         where=patient_dir, hint="raise pad_depth_to or trim the volumes")
    return preprocess.pad_depth(vol, target, mode)


def patient_spacing(patient_dir, modality: str, image_size=None) -> tuple[float, float, float]:
    """(x, y, z) mm of a patient's ``modality`` after the in-plane resize (from the header)."""
    img = nifti.load_header(_modality_path(Path(patient_dir), modality))
    spacing = nifti.spacing_of(img)
    return spacing if image_size is None else preprocess.resized_spacing(spacing, img.shape[:2], image_size)


def _check_mode(mode: str) -> tuple[str, ...]:
    if mode not in MODES:
        raise UsageError(f"unknown mode '{mode}'", where="mode",
                         hint=did_you_mean(mode, MODES) or f"choose one of {', '.join(MODES)}")
    return MODES[mode]


def _empty_cond(spatial) -> torch.Tensor:
    return torch.zeros((0, *spatial), dtype=torch.float32)


class SliceDataset(Dataset):
    """Axial 2D slices of a split, kept by the slice rules; built once at construction.

    Every selected volume stays in memory as float32 (about 4·D·H·W bytes per modality and patient:
    ~40 MB for 150×256×256), so a full 105-patient bravo split needs ~8 GB; use ``image_size`` 128
    (~2 GB) or the 3D dataset for lower memory.
    """

    def __init__(self, root, split: str, mode: str, image_size=None, normalization: str = "minmax", cache_dir=None):
        self.mode, self.image_size = mode, image_size
        self.modalities = _check_mode(mode)
        self.patient_dirs = layout.patients(root, split)
        self.split_folder = Path(root) if split == "all" else layout.split_dir(root, split)
        self._volumes, self._spacing, self.index = [], [], []  # index: (patient number, slice)
        for p, pdir in enumerate(self.patient_dirs):
            vols = load_patient(pdir, self.modalities, image_size, normalization, cache_dir=cache_dir)
            self._volumes.append(vols)
            self._spacing.append(patient_spacing(pdir, self.modalities[0], image_size))
            self.index += [(p, int(d)) for d in self._kept_slices(vols)]
        if not self.index:
            raise InputError(f"no slices kept in split '{split}' for mode '{mode}'", where=self.split_folder,
                             hint="the volumes are empty or (seg mode) hold no tumour slice")

    def _kept_slices(self, vols: dict) -> np.ndarray:
        """Indices of the slices that pass the rules for this mode."""
        if self.mode == "seg":
            return np.flatnonzero(vols["seg"].sum(axis=(1, 2)) >= SEG_MIN_PIXELS)
        images = [vols[m] for m in self.modalities if m != "seg"]
        keep = np.logical_and.reduce([v.sum(axis=(1, 2)) > SLICE_MIN_SUM for v in images])  # (D,)
        return np.flatnonzero(keep)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        p, d = self.index[i]
        vols = self._volumes[p]
        image = torch.from_numpy(vols[self.modalities[0]][d][None].copy())  # (1, H, W)
        cond = torch.from_numpy(vols["seg"][d][None].copy()) if self.mode == "bravo" \
            else _empty_cond(image.shape[1:])  # (1, H, W) | (0, H, W)
        return {"image": image, "cond": cond, "patient": self.patient_dirs[p].name, "slice": d}

    def spacing_of(self, i: int) -> tuple[float, float, float]:
        """(x, y, z) mm of item ``i``'s volume after the in-plane resize."""
        return self._spacing[self.index[i][0]]


class VolumeDataset(Dataset):
    """Whole 3D volumes of a split, one item per patient, loaded on access (through the cache).

    Depth is padded at the end to ``pad_depth_to`` (160 by default: divisible by 32). Only the
    current item is held in memory.
    """

    def __init__(self, root, split: str, mode: str, image_size=None, normalization: str = "minmax",
                 pad_depth_to: int | None = 160, pad_mode: str = "replicate", cache_dir=None):
        self.mode, self.image_size, self.normalization = mode, image_size, normalization
        self.pad_depth_to, self.pad_mode, self.cache_dir = pad_depth_to, pad_mode, cache_dir
        self.modalities = _check_mode(mode)
        if pad_mode not in preprocess.PAD_MODES:
            raise UsageError(f"unknown pad mode '{pad_mode}'", where="pad_mode",
                             hint=f"choose one of {', '.join(preprocess.PAD_MODES)}")
        self.patient_dirs = layout.patients(root, split)
        for pdir in self.patient_dirs:  # fail early on a missing file, not at step N
            for m in self.modalities:
                _modality_path(pdir, m)

    def __len__(self) -> int:
        return len(self.patient_dirs)

    def __getitem__(self, i: int) -> dict:
        pdir = self.patient_dirs[i]
        vols = load_patient(pdir, self.modalities, self.image_size, self.normalization,
                            self.pad_depth_to, self.pad_mode, self.cache_dir)
        image = torch.from_numpy(vols[self.modalities[0]][None])  # (1, D, H, W)
        cond = torch.from_numpy(vols["seg"][None]) if self.mode == "bravo" \
            else _empty_cond(image.shape[1:])  # (1, D, H, W) | (0, D, H, W)
        return {"image": image, "cond": cond, "patient": pdir.name, "slice": -1}

    def spacing_of(self, i: int) -> tuple[float, float, float]:
        """(x, y, z) mm of patient ``i`` after the in-plane resize (depth padding does not change it)."""
        return patient_spacing(self.patient_dirs[i], self.modalities[0], self.image_size)

    def depth_of(self, i: int) -> int:
        """Slices of patient ``i`` before depth padding (to trim generated volumes back)."""
        return int(nifti.load_header(_modality_path(self.patient_dirs[i], self.modalities[0])).shape[2])
