"""Patients, 2D slices and 3D volumes as torch datasets (the only torch import of ``data``).

``load_patient`` reads a patient's modalities as ``(D, H, W)`` float32: images normalised to [0, 1]
and resized in-plane, ``seg`` binary {0, 1}; optionally padded in depth. The work per file goes
through the volume cache (``cache.py``).

Modes (SYSTEM.md §3; image channels | condition channels):

- ``bravo``: bravo | seg.                      - ``seg``: seg | nothing (a zero-channel tensor).
- ``dual``: t1_pre, t1_gd | seg.
- ``multi``: one of bravo, flair, t1_pre, t1_gd | seg + 4 constant maps holding the one-hot modality
  id (bravo 0, flair 1, t1_pre 2, t1_gd 3); the four modalities are pooled (items = patient ×
  modality × slice) and ``groups()`` lists the items of each modality id for homogeneous batches.
- ``seg_conditioned`` / ``seg_conditioned_input``: seg | 7 constant maps, bin k filled with
  count_k / max_count (SYSTEM.md §1 size bins: exact Feret, face connectivity, spacing from the
  header or ``spacing``, resized with the image; ``bin_spacing`` fixes it, as the reference's 3D modes
  did). The input variant feeds the maps to the network; the FiLM variant's model
  reads them back as a vector (models/conditioning.py).

Vector conditions travel as constant maps so that every consumer (collate, condition dropout, CFG's
zero condition, validation, evaluation, previews) handles one condition tensor.

An item is ``{"image": (C, H, W) | (C, D, H, W) float32, "cond": (C', …) float32, "patient": str,
"slice": int (-1 for volumes)}`` plus ``"mode_id"`` (multi) or ``"bins"`` (int64 (7,), seg-conditioned).

2D slice rules (SYSTEM.md §1): slices are axial (the D axis in memory); a slice is kept only when
every image channel sums to more than 1.0 (on [0, 1] data); the seg-generating modes keep only slices
with at least 10 tumour pixels. Empty-tumour slices are kept in the image modes. Order: sorted
patients, (multi: modality id,) increasing slice. Optional 2D augmentation: data/augment.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError, UsageError, did_you_mean
from . import cache, layout, nifti, preprocess

# mode → (generated image modalities, whether the mask is a condition, whether size bins condition)
MODES = {"bravo": ("bravo", "seg"), "seg": ("seg",), "dual": ("t1_pre", "t1_gd", "seg"),
         "multi": ("bravo", "flair", "t1_pre", "t1_gd", "seg"), "seg_conditioned": ("seg",),
         "seg_conditioned_input": ("seg",)}  # mode → modalities it reads
MODE_IDS = {"bravo": 0, "flair": 1, "t1_pre": 2, "t1_gd": 3}
SEG_MODES = ("seg", "seg_conditioned", "seg_conditioned_input")  # modes that generate masks
BIN_MODES = ("seg_conditioned", "seg_conditioned_input")
N_BINS = 7
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


def image_modalities(mode: str) -> tuple[str, ...]:
    """Modalities generated by ``mode`` (multi: any one of them per item)."""
    if mode in SEG_MODES:
        return ("seg",)
    return tuple(m for m in _check_mode(mode) if m != "seg")


def _empty_cond(spatial) -> torch.Tensor:
    return torch.zeros((0, *spatial), dtype=torch.float32)


def constant_maps(values, spatial) -> torch.Tensor:
    """(K,) values → (K, *spatial) float32 maps, map k filled with values[k]."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return v.reshape(-1, *([1] * len(spatial))).expand(-1, *spatial).contiguous()


def mode_maps(mode_id: int, spatial) -> torch.Tensor:
    """One-hot(4) modality id as constant maps (4, *spatial)."""
    return constant_maps(np.eye(len(MODE_IDS), dtype=np.float32)[mode_id], spatial)


def bin_maps(bins, spatial, max_count: int = 10) -> torch.Tensor:
    """Size-bin counts (7,) as constant maps (7, *spatial), value count / max_count."""
    return constant_maps(np.minimum(np.asarray(bins, dtype=np.float32), max_count) / max_count, spatial)


def array_spacing(spacing_xyz, ndim: int) -> tuple[float, ...]:
    """(x, y, z) mm → the in-memory axis order: (H, W) = (x, y) for a slice, (D, H, W) = (z, x, y)."""
    sx, sy, sz = spacing_xyz
    return (sx, sy) if ndim == 2 else (sz, sx, sy)


def _mask_bins(mask: np.ndarray, spacing_xyz, max_count: int, sampled: bool) -> np.ndarray:
    from .sizebins import size_bins

    return size_bins(mask, array_spacing(spacing_xyz, mask.ndim), max_count=max_count, compat_sampled=sampled,
                     seed=0 if sampled else None)


class _ModeItems:
    """What SliceDataset and VolumeDataset share: the condition of an item from its arrays."""

    def _init_mode(self, mode, spacing, max_count, sampled_feret, bin_spacing=None):
        self.mode = mode
        self.modalities = _check_mode(mode)
        self.spacing_override = tuple(spacing) if spacing is not None else None
        self.max_count, self.sampled_feret = int(max_count), bool(sampled_feret)
        # compat.reference_bin_spacing: a fixed (x, y, z) mm for size bins, not resized with the image
        self.bin_spacing = tuple(float(v) for v in bin_spacing) if bin_spacing is not None else None

    def _spacing_for(self, pdir: Path, image_size) -> tuple[float, float, float]:
        if self.spacing_override is None:
            return patient_spacing(pdir, self.modalities[0], image_size)
        if image_size is None:
            return self.spacing_override
        img = nifti.load_header(_modality_path(pdir, self.modalities[0]))
        return preprocess.resized_spacing(self.spacing_override, img.shape[:2], image_size)

    def _item(self, vols: dict, modality: str, sl, spacing, tr=None, bins_key=None) -> dict:
        """Image and condition tensors; ``sl`` indexes the depth axis (an int for a slice)."""
        names = ("seg",) if self.mode in SEG_MODES else ((modality,) if self.mode == "multi"
                                                         else image_modalities(self.mode))
        arrs = [vols[m][sl] for m in names]
        has_mask = self.mode in ("bravo", "dual", "multi")
        if has_mask:
            arrs.append(vols["seg"][sl])
        stack = np.stack(arrs).astype(np.float32, copy=False)  # (C_img [+1], ...)
        if tr is not None:
            from . import augment

            stack = augment.apply(stack, tr)
        image = torch.from_numpy(np.ascontiguousarray(stack[:len(names)]))
        spatial = tuple(image.shape[1:])
        out = {}
        if self.mode in BIN_MODES:
            bins = self._bins(stack[0], spacing, bins_key)
            cond = bin_maps(bins, spatial, self.max_count)
            out["bins"] = torch.from_numpy(bins)
        elif has_mask:
            cond = torch.from_numpy(np.ascontiguousarray(stack[len(names):]))
            if self.mode == "multi":
                out["mode_id"] = MODE_IDS[modality]
                cond = torch.cat([cond, mode_maps(MODE_IDS[modality], spatial)])
        else:
            cond = _empty_cond(spatial)
        return {"image": image, "cond": cond, **out}

    def _bins(self, mask: np.ndarray, spacing, key) -> np.ndarray:
        cache = self.__dict__.setdefault("_bin_cache", {})
        if key is not None and key in cache:
            return cache[key]
        bins = _mask_bins(mask, self.bin_spacing or spacing, self.max_count, self.sampled_feret)
        if key is not None:
            cache[key] = bins
        return bins


class SliceDataset(_ModeItems, Dataset):
    """Axial 2D slices of a split, kept by the slice rules; built once at construction.

    Every selected volume stays in memory as float32 (about 4·D·H·W bytes per modality and patient:
    ~40 MB for 150×256×256), so a full 105-patient bravo split needs ~8 GB; use ``image_size`` 128
    (~2 GB) or the 3D dataset for lower memory.

    ``augment`` ("none" | "static" | "dynamic", data/augment.py) is keyed by ``seed``; ``set_epoch``
    selects the epoch of dynamic draws. ``spacing`` (x, y, z) mm overrides the header for size bins;
    ``bin_spacing`` (x, y, z) mm is used for size bins as it is, not resized (``compat.reference_bin_spacing``).
    """

    def __init__(self, root, split: str, mode: str, image_size=None, normalization: str = "minmax", cache_dir=None,
                 augment: str = "none", seed: int = 0, spacing=None, max_count: int = 10,
                 sampled_feret: bool = False, bin_spacing=None):
        self._init_mode(mode, spacing, max_count, sampled_feret, bin_spacing)
        self.image_size = image_size
        self.patient_dirs = layout.patients(root, split)
        self.split_folder = Path(root) if split == "all" else layout.split_dir(root, split)
        # index: (patient number, slice); _modality[i]: the generated image of item i (differs in multi)
        self._volumes, self._spacing, self.index, self._modality = [], [], [], []
        images = image_modalities(mode)
        for p, pdir in enumerate(self.patient_dirs):
            vols = load_patient(pdir, self.modalities, image_size, normalization, cache_dir=cache_dir)
            self._volumes.append(vols)
            self._spacing.append(self._spacing_for(pdir, image_size))
            for m in (images if mode == "multi" else images[:1]):
                kept = [(p, int(d)) for d in self._kept_slices(vols, m)]
                self.index += kept
                self._modality += [m] * len(kept)
        if not self.index:
            raise InputError(f"no slices kept in split '{split}' for mode '{mode}'", where=self.split_folder,
                             hint="the volumes are empty or (seg modes) hold no tumour slice")
        from .augment import SliceAugmenter

        h, w = self._volumes[0][self.modalities[0]].shape[1:]
        self.augmenter = SliceAugmenter(augment, seed, len(self.index), h, w)

    def _kept_slices(self, vols: dict, modality: str) -> np.ndarray:
        """Indices of the slices that pass the rules for this mode."""
        if self.mode in SEG_MODES:
            return np.flatnonzero(vols["seg"].sum(axis=(1, 2)) >= SEG_MIN_PIXELS)
        names = (modality,) if self.mode == "multi" else image_modalities(self.mode)
        keep = np.logical_and.reduce([vols[m].sum(axis=(1, 2)) > SLICE_MIN_SUM for m in names])  # (D,)
        return np.flatnonzero(keep)

    def set_epoch(self, epoch: int) -> None:
        """Dynamic augmentation draws from (seed, epoch, index)."""
        self.augmenter.epoch = int(epoch)

    def groups(self) -> list[list[int]]:
        """Item indices per modality id (multi; one group otherwise), for homogeneous batches."""
        if self.mode != "multi":
            return [list(range(len(self.index)))]
        out = {k: [] for k in range(len(MODE_IDS))}
        for i, m in enumerate(self._modality):
            out[MODE_IDS[m]].append(i)
        return [g for g in out.values() if g]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        (p, d), m = self.index[i], self._modality[i]
        tr = self.augmenter.transform(i)
        key = i if self.augmenter.kind != "dynamic" or tr.identity else None  # memoised bins
        item = self._item(self._volumes[p], m, d, self._spacing[p], None if tr.identity else tr, key)
        return {**item, "patient": self.patient_dirs[p].name, "slice": d}

    def spacing_of(self, i: int) -> tuple[float, float, float]:
        """(x, y, z) mm of item ``i``'s volume after the in-plane resize."""
        return self._spacing[self.index[i][0]]

    def modality_of(self, i: int) -> str:
        return self._modality[i]


class VolumeDataset(_ModeItems, Dataset):
    """Whole 3D volumes of a split, one item per patient (multi: per patient and modality), loaded on
    access (through the cache).

    Depth is padded at the end to ``pad_depth_to`` (160 by default: divisible by 32). Only the
    current item is held in memory. Size bins are computed on the unpadded volume.
    """

    def __init__(self, root, split: str, mode: str, image_size=None, normalization: str = "minmax",
                 pad_depth_to: int | None = 160, pad_mode: str = "replicate", cache_dir=None, spacing=None,
                 max_count: int = 10, sampled_feret: bool = False, bin_spacing=None):
        self._init_mode(mode, spacing, max_count, sampled_feret, bin_spacing)
        self.image_size, self.normalization = image_size, normalization
        self.pad_depth_to, self.pad_mode, self.cache_dir = pad_depth_to, pad_mode, cache_dir
        if pad_mode not in preprocess.PAD_MODES:
            raise UsageError(f"unknown pad mode '{pad_mode}'", where="pad_mode",
                             hint=f"choose one of {', '.join(preprocess.PAD_MODES)}")
        self.patient_dirs = layout.patients(root, split)
        for pdir in self.patient_dirs:  # fail early on a missing file, not at step N
            for m in self.modalities:
                _modality_path(pdir, m)
        images = image_modalities(mode)
        self.index = [(p, m) for m in (images if mode == "multi" else images[:1])
                      for p in range(len(self.patient_dirs))]

    def set_epoch(self, epoch: int) -> None:
        pass

    def groups(self) -> list[list[int]]:
        if self.mode != "multi":
            return [list(range(len(self.index)))]
        out: dict[str, list[int]] = {}
        for i, (_, m) in enumerate(self.index):
            out.setdefault(m, []).append(i)
        return list(out.values())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        p, m = self.index[i]
        pdir = self.patient_dirs[p]
        names = [m, "seg"] if self.mode == "multi" else list(self.modalities)
        vols = load_patient(pdir, names, self.image_size, self.normalization,
                            self.pad_depth_to, self.pad_mode, self.cache_dir)
        depth = self.depth_of(i) if self.mode in BIN_MODES else None
        spacing = self._spacing_for(pdir, self.image_size) if self.mode in BIN_MODES else None
        if depth is not None:  # bins from the unpadded mask (replicated slices would stretch tumours)
            self._bins(vols["seg"][:depth], spacing, p)
        item = self._item(vols, m, slice(None), spacing, None, p)
        return {**item, "patient": pdir.name, "slice": -1}

    def spacing_of(self, i: int) -> tuple[float, float, float]:
        """(x, y, z) mm of item ``i`` after the in-plane resize (depth padding does not change it)."""
        return self._spacing_for(self.patient_dirs[self.index[i][0]], self.image_size)

    def depth_of(self, i: int) -> int:
        """Slices of item ``i`` before depth padding (to trim generated volumes back)."""
        return int(nifti.load_header(_modality_path(self.patient_dirs[self.index[i][0]],
                                                    self.modalities[0])).shape[2])

    def modality_of(self, i: int) -> str:
        return self.index[i][1]
