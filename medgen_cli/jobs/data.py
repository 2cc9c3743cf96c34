"""``medgen data``: thin jobs behind ``data synth``, ``data check`` and ``data prepare``.

They validate the arguments a user types, call the data layer, and return what the CLI prints.
No torch is imported here (``prepare`` imports MONAI lazily for the resize).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path

from .. import records
from ..errors import InputError, UsageError
from ..data import layout, phantom, prepare as prepare_mod

log = logging.getLogger("medgen")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if int(value) < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}", where=f"--{name}")


def synth(out, n_train: int = 6, n_val: int = 2, n_test: int = 2, size: int = 256, depth: int = 150,
          seed: int = 0, overwrite: bool = False) -> Path:
    """Write a phantom dataset to ``out``; returns its path."""
    for name, value in (("n-train", n_train), ("n-val", n_val), ("n-test", n_test), ("seed", seed)):
        _positive(name, value, minimum=0)
    _positive("size", size, 8)
    _positive("depth", depth, 4)
    return phantom.synth_dataset(out, n_train, n_val, n_test, size, depth, seed, overwrite=overwrite)


def check(root, modalities=None, splits=None) -> list[layout.Problem]:
    """Every problem of the dataset at ``root`` (errors and notices)."""
    return layout.check_dataset(root, modalities=modalities, splits=splits)


def problem_record(p: layout.Problem) -> dict:
    """A ``problem`` JSON record (schema medgen/1) of one check finding."""
    return records.make("problem", **asdict(p))


def report_check(root, as_json: bool = False, modalities=None, splits=None) -> list[layout.Problem]:
    """``medgen data check``: print every finding on stdout (a line, or a record with --json);
    raise InputError (exit 4) when any of them is an error. Notices alone pass."""
    problems = check(root, modalities, splits)
    for p in problems:
        if as_json:
            records.write(problem_record(p))
        else:
            sys.stdout.write(f"{p}\n" + (f"  hint: {p.hint}\n" if p.hint else ""))
    sys.stdout.flush()
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise InputError(f"{len(errors)} problem(s) in the dataset, first: {errors[0].what}", where=root,
                         hint="fix the files listed on stdout, then run 'medgen data check' again")
    log.info("dataset ok: %s (%d notice(s))", root, len(problems))
    return problems


def prepare(raw, out, seed: int = 42, size: int = 256, depth: int = 150, compat_split: bool = False) -> Path:
    """Convert the raw BrainMetShare release at ``raw`` into the medgen layout at ``out``."""
    _positive("size", size, 8)
    _positive("depth", depth, 1)
    return prepare_mod.prepare_brainmetshare(raw, out, seed=seed, size=size, depth=depth,
                                             compat_split=compat_split)


def atlas(root, out=None, split: str = "train", size: int | None = None, threshold: float = 0.05) -> Path:
    """``medgen data atlas``: the brain atlas of ``root/split`` (union of bravo > threshold) as a mask
    NIfTI; default path ROOT/atlas-<size>.nii.gz. Returns the path."""
    from ..data import atlas as atlas_mod

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}", where=root, hint="give a BrainMetShare-layout root")
    if size is not None:
        _positive("size", size, 8)
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"threshold must be in [0, 1), got {threshold}", where="--threshold")
    arr, spacing, n = atlas_mod.build_atlas(root, split, size, threshold)
    out = Path(out) if out else root / f"atlas-{size or arr.shape[-1]}.nii.gz"
    atlas_mod.write_atlas(out, arr, spacing)
    log.info("atlas of %d patient(s) of '%s': %d voxels inside (%.1f%%)", n, split, int(arr.sum()), 100 * arr.mean())
    return out
