"""The dataset layout ``ROOT/{train,val,test_new}/<patient>/{bravo,t1_pre,t1_gd,flair,seg}.nii.gz``,
its splits, and ``check_dataset``, which lists every problem of a dataset at once.

Split names: ``train``, ``val``, ``test_new``; ``test`` means ``test_new`` when that folder exists
(else a raw ``test/`` folder); ``all`` is the union of distinct patient names over every split folder.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError, did_you_mean
from . import nifti

SPLITS = ("train", "val", "test_new")
MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair", "seg")
IMAGE_MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair")
MODE_IDS = {"bravo": 0, "flair": 1, "t1_pre": 2, "t1_gd": 3}
SPLIT_NAMES = (*SPLITS, "test", "all")  # what a user may type

LAYOUT_HINT = ("expected ROOT/{train,val,test_new}/<patient>/{bravo,t1_pre,t1_gd,flair,seg}.nii.gz; "
               "make one with 'medgen data prepare' or 'medgen data synth'")


def split_dir(root, name: str) -> Path:
    """The folder of split ``name`` under ``root`` (``test`` → ``test_new`` when it exists)."""
    root = Path(root)
    if name == "test":
        return root / "test" if (root / "test").is_dir() and not (root / "test_new").is_dir() \
            else root / "test_new"
    if name == "all":
        raise UsageError("split 'all' is a union of folders, not one folder", where="split",
                         hint="use layout.patients(root, 'all')")
    if name not in SPLITS:
        close = did_you_mean(name, SPLIT_NAMES)
        raise UsageError(f"unknown split '{name}'", where="split",
                         hint=f"{close + ' ' if close else ''}choose one of {', '.join(SPLIT_NAMES)}")
    return root / name


def _patient_dirs(folder: Path) -> list[Path]:
    """Sorted sub-folders of a split folder (hidden ones skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise InputError("dataset folder not found", where=root, hint=LAYOUT_HINT)


def patients(root, split: str) -> list[Path]:
    """Sorted patient folders of ``split`` (``all``: distinct names over every split folder)."""
    root = Path(root)
    _require_root(root)
    if split == "all":
        return _all_patients(root)
    folder = split_dir(root, split)
    if not folder.is_dir():
        raise InputError(f"split folder '{folder.name}' not found", where=folder, hint=LAYOUT_HINT)
    found = _patient_dirs(folder)
    if not found:
        raise InputError(f"split folder '{folder.name}' has no patient folders", where=folder,
                         hint=LAYOUT_HINT)
    return found


def _all_patients(root: Path) -> list[Path]:
    """Union over train/val/test_new (and a raw test/), first occurrence of a name wins."""
    seen: dict[str, Path] = {}
    for name in (*SPLITS, "test"):
        if (root / name).is_dir():
            for p in _patient_dirs(root / name):
                seen.setdefault(p.name, p)
    if not seen:
        raise InputError("no patient folders in any split", where=root, hint=LAYOUT_HINT)
    return [seen[k] for k in sorted(seen)]


# ---------------------------------------------------------------------------------------------
# check_dataset


@dataclass(frozen=True)
class Problem:
    """One finding of ``check_dataset``: where, what, how to fix, and how bad."""

    path: str
    what: str
    hint: str = ""
    severity: str = "error"  # "error" | "notice"

    def __str__(self) -> str:
        return f"{self.severity}: {self.what} ({self.path})"


def check_dataset(root, modalities=None, splits=None) -> list[Problem]:
    """Every problem of the dataset at ``root`` (empty list = fine). Headers give shapes; data is
    read for masks and for images whose on-disk type can hold NaN."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "dataset folder not found", LAYOUT_HINT)]
    mods = tuple(modalities) if modalities else MODALITIES
    _check_modality_names(mods)
    problems: list[Problem] = []
    for name in (splits or ("train", "val", "test")):
        problems += _check_split(split_dir(root, name), mods)
    return problems


def _check_modality_names(mods) -> None:
    for m in mods:
        if m not in MODALITIES:
            raise UsageError(f"unknown modality '{m}'", where="modalities",
                             hint=did_you_mean(m, MODALITIES) or f"choose from {', '.join(MODALITIES)}")


def _check_split(folder: Path, mods) -> list[Problem]:
    if not folder.is_dir():
        return [Problem(str(folder), f"split folder '{folder.name}' missing", LAYOUT_HINT)]
    found = _patient_dirs(folder)
    if not found:
        return [Problem(str(folder), f"split folder '{folder.name}' is empty", LAYOUT_HINT)]
    return [p for patient in found for p in _check_patient(patient, mods)]


def _check_patient(patient: Path, mods) -> list[Problem]:
    problems, shapes = [], {}
    for m in mods:
        path = nifti.find_modality(patient, m)
        if path is None:
            problems.append(Problem(str(patient / f"{m}.nii.gz"), f"missing modality file '{m}.nii.gz'",
                                    "add the file: every patient folder holds bravo, t1_pre, t1_gd, flair and seg"))
            continue
        shape, found = _check_file(path, is_mask=(m == "seg"))
        problems += found
        if shape is not None:
            shapes[m] = shape
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{m} {s}" for m, s in shapes.items())
        problems.append(Problem(str(patient), f"modalities have different shapes: {listed}",
                                "resample or re-export so every modality has the same grid"))
    return problems


def _check_file(path: Path, is_mask: bool):
    """(shape or None, problems) for one file."""
    try:
        img = nifti.load_header(path)
    except InputError as exc:
        return None, [Problem(str(path), f"unreadable or not a NIfTI file ({exc.what})", exc.hint)]
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        return shape, [Problem(str(path), f"expected a 3-D volume, found shape {shape}",
                               "medgen reads one (H, W, D) volume per file")]
    shape = shape[:3]
    if not is_mask and not _may_hold_nan(img):
        return shape, []
    return shape, _check_values(img, path, is_mask)


def _may_hold_nan(img) -> bool:
    """Integer files without scaling cannot hold NaN/Inf, so their data need not be read."""
    dtype = img.get_data_dtype()
    slope, inter = img.header.get_slope_inter()
    return not np.issubdtype(dtype, np.integer) or slope is not None or inter is not None


def _check_values(img, path: Path, is_mask: bool) -> list[Problem]:
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32))  # (H, W, D)
    except Exception as exc:
        return [Problem(str(path), f"cannot read voxel data ({exc})", "the file may be truncated")]
    if is_mask:
        found = nifti.mask_problem(arr)
        if found is None:
            return []
        hint = "binarised automatically" if found[0] == "notice" else \
            "a mask must hold 0 (background) and one positive value (tumour)"
        return [Problem(str(path), found[1].replace("; binarised (> 0)", "; will be binarised (> 0)"),
                        hint, severity=found[0])]
    bad = nifti.nonfinite_count(arr)
    return [Problem(str(path), f"volume has {bad} NaN/Inf voxels", "fix or re-export the file")] if bad else []
