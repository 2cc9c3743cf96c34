"""Turn the public Stanford BrainMetShare release into the medgen layout (SYSTEM.md §1).

Accepted raw formats (found by looking for folders named ``train``/``test`` or ending in
``_train``/``_test`` in ``raw`` and up to two levels below it):

1. The official release (Stanford AIMI / Redivis), per-sequence PNG slice folders::

       RAW/[stanford_release_brainmask/]mets_stanford_releaseMask_train/<case>/{0,1,2,3,seg}/<n>.png
       RAW/[stanford_release_brainmask/]mets_stanford_releaseMask_test/<case>/{0,1,2,3}/<n>.png

   Sequence folders → medgen modalities (as documented by data loaders that read the release):
   ``0`` T1 gradient-echo post-contrast (GE BRAVO) → ``bravo``; ``1`` T1 spin-echo pre-contrast →
   ``t1_pre``; ``2`` T1 spin-echo post-contrast → ``t1_gd``; ``3`` T2 FLAIR → ``flair``; ``seg``
   metastasis mask stored as {0, 255} → ``seg``. Slices are stacked in numeric file-name order as
   the depth axis; a PNG's rows are H, its columns W. PNGs carry no spacing: ``png_spacing``
   (default 0.9375, 0.9375, 1.0 mm at the stored size: 240 mm over 256 px, 1 mm slices) is assumed.
   The official test cases may come without masks; such a case is written without ``seg.nii.gz``
   (a warning names it) and ``medgen data check`` will report it.
2. NIfTI per patient, as used by the reference's own preprocessing and by NIfTI redistributions::

       RAW/{train,test}/<case>/{bravo,t1_pre,t1_gd,flair,seg}.nii[.gz]

   Spacing comes from the headers.

Processing per case: every slice is zero-padded symmetrically to a square (side = max(H, W,
``pad_to``); the reference padded to 240), then resized to ``size`` × ``size`` (bilinear for images;
nearest and ``> 0.5`` for masks); all modalities are brought to min(own smallest depth, ``depth``)
slices by truncation or zero padding at the end. The release's training cases form ``train``; its
test cases are split into ``val`` (⌊n/2⌋ of them: 25 of 51) and ``test_new`` (the rest) by
``numpy.random.default_rng(seed).permutation`` of the sorted case names. ``compat_split=True``
instead reproduces the reference's rule (``random.Random(seed).shuffle`` of the sorted list, first
⌊n/2⌋ to val), which gives the reference's membership when the case names match.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from . import nifti, preprocess
from .layout import MODALITIES

log = logging.getLogger("medgen")

PNG_SEQUENCES = {"0": "bravo", "1": "t1_pre", "2": "t1_gd", "3": "flair", "seg": "seg"}
PNG_SPACING = (0.9375, 0.9375, 1.0)
RAW_HINT = ("expected RAW/mets_stanford_releaseMask_{train,test}/<case>/{0,1,2,3,seg}/*.png (official "
            "release) or RAW/{train,test}/<case>/{bravo,t1_pre,t1_gd,flair,seg}.nii.gz")


# ---------------------------------------------------------------------------------------------
# finding the release


def _split_kind(name: str) -> str | None:
    low = name.lower()
    for kind in ("train", "test"):
        if low == kind or low.endswith("_" + kind):
            return kind
    return None


def _candidates(raw: Path):
    """(depth, folder) for raw and its sub-folders up to two levels down."""
    yield 0, raw
    for child in sorted(p for p in raw.iterdir() if p.is_dir()):
        yield 1, child
        for grand in sorted(p for p in child.iterdir() if p.is_dir()):
            yield 2, grand


def find_release(raw) -> dict[str, Path]:
    """{"train": folder, "test": folder (if present)} of the raw release."""
    raw = Path(raw)
    if not raw.is_dir():
        raise InputError("raw BrainMetShare folder not found", where=raw, hint=RAW_HINT)
    found: dict[str, list] = {"train": [], "test": []}
    for depth, folder in _candidates(raw):
        kind = _split_kind(folder.name)
        if kind:
            found[kind].append((depth, folder))
    return {kind: _pick(kind, hits, raw) for kind, hits in found.items() if hits or kind == "train"}


def _pick(kind: str, hits: list, raw: Path) -> Path:
    if not hits:
        raise InputError(f"no '{kind}' folder of the BrainMetShare release found", where=raw, hint=RAW_HINT)
    best = min(d for d, _ in hits)
    top = [f for d, f in hits if d == best]
    if len(top) > 1:
        raise InputError(f"several '{kind}' folders found: {', '.join(str(f) for f in top)}", where=raw,
                         hint="point RAW at the folder that holds one train and one test folder")
    return top[0]


def _cases(split_root: Path) -> list[Path]:
    cases = sorted(p for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise InputError("no case folders", where=split_root, hint=RAW_HINT)
    return cases


def case_format(case: Path) -> str:
    """``png`` (sequence sub-folders 0–3) or ``nifti`` (bravo.nii[.gz] …)."""
    if all((case / k).is_dir() for k in ("0", "1", "2", "3")):
        return "png"
    if nifti.find_modality(case, "bravo") is not None:
        return "nifti"
    raise InputError("case folder has neither sequence folders 0-3 nor bravo.nii.gz", where=case, hint=RAW_HINT)


# ---------------------------------------------------------------------------------------------
# reading one case


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]


def read_png_stack(folder: Path) -> np.ndarray:
    """PNG slices of one sequence, in numeric file-name order → float32 (D, H, W)."""
    from PIL import Image

    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png"), key=_natural_key)
    if not files:
        raise InputError("no PNG slices", where=folder, hint=RAW_HINT)
    slices = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im)
        except Exception as exc:
            raise InputError(f"unreadable PNG: {exc}", where=f, hint="re-download the release") from exc
        slices.append(a[..., 0] if a.ndim == 3 else a)  # colour PNG → first channel
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InputError(f"slices have different sizes {sorted(shapes)}", where=folder, hint="re-download the release")
    return np.stack(slices).astype(np.float32)  # (D, H, W)


def _binarise_png_mask(vol: np.ndarray, where: Path) -> np.ndarray:
    problem = nifti.mask_problem(vol)
    if problem and problem[0] == "error":
        raise InputError(problem[1], where=where, hint="a mask holds 0 and one positive value")
    return (vol > 0).astype(np.float32)


def _read_sequence(case: Path, modality: str, fmt: str):
    """(volume (D, H, W) float32 or None when missing, spacing (x, y, z) or None)."""
    if fmt == "png":
        key = next(k for k, m in PNG_SEQUENCES.items() if m == modality)
        if not (case / key).is_dir():
            return None, None
        vol = read_png_stack(case / key)
        return (_binarise_png_mask(vol, case / key) if modality == "seg" else vol), None
    path = nifti.find_modality(case, modality)
    if path is None:
        return None, None
    if modality == "seg":
        return nifti.to_dhw(nifti.require_volume(nifti.read_mask(path), path)).astype(np.float32), None
    vol, spacing, _ = nifti.read_image(path)
    return nifti.to_dhw(nifti.require_volume(vol, path)), spacing


def read_case(case: Path, require_seg: bool) -> tuple[dict, tuple]:
    """{modality: (D, H, W) float32} and the (x, y, z) spacing of one raw case."""
    fmt = case_format(case)
    vols, spacing = {}, None
    for m in MODALITIES:
        vol, sp = _read_sequence(case, m, fmt)
        if vol is None and (m != "seg" or require_seg):
            raise InputError(f"case lacks the '{m}' sequence", where=case, hint=RAW_HINT)
        if vol is not None:
            vols[m] = vol
        spacing = spacing or sp
    if "seg" not in vols:
        log.warning("no mask for %s; written without seg.nii.gz", case)
    return vols, tuple(spacing) if spacing else PNG_SPACING


# ---------------------------------------------------------------------------------------------
# geometry


def pad_square(vol: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """Zero-pad H and W of ``vol`` (D, H, W) symmetrically to a square of side max(H, W, pad_to)."""
    _, h, w = vol.shape
    side = max(h, w, pad_to or 0)
    ph, pw = side - h, side - w
    return np.pad(vol, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def fit_depth(vol: np.ndarray, depth: int) -> np.ndarray:
    """Truncate or zero-pad ``vol`` (D, H, W) at the end to ``depth`` slices."""
    if vol.shape[0] >= depth:
        return vol[:depth]
    return np.pad(vol, ((0, depth - vol.shape[0]), (0, 0), (0, 0)))


def process_case(vols: dict, spacing, size: int, depth: int, pad_to: int | None = None):
    """Pad to square, resize to ``size``, align depth → ({modality: (D', size, size)}, spacing)."""
    squared = {m: pad_square(v, pad_to) for m, v in vols.items()}
    side = next(iter(squared.values())).shape[1]
    out = {m: preprocess.resize_inplane(v, size, is_mask=(m == "seg"), mode="nearest" if m == "seg" else "bilinear")
           for m, v in squared.items()}
    target = min(min(v.shape[0] for v in out.values()), depth)
    out = {m: fit_depth(v, target) for m, v in out.items()}
    return out, preprocess.resized_spacing(spacing, (side, side), size)


# ---------------------------------------------------------------------------------------------
# splitting and writing


def split_test(names, seed: int = 42, compat_split: bool = False) -> tuple[list, list]:
    """(val, test_new): ⌊n/2⌋ sorted names to val, the rest to test_new (see module docstring)."""
    names = sorted(names)
    if compat_split:
        order = list(names)
        random.Random(seed).shuffle(order)
    else:
        order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_val = len(names) // 2
    return sorted(order[:n_val]), sorted(order[n_val:])


def _write_case(case: Path, dest: Path, size: int, depth: int, pad_to, require_seg: bool) -> None:
    vols, spacing = read_case(case, require_seg)
    out, new_spacing = process_case(vols, spacing, size, depth, pad_to)
    for m, v in out.items():
        nifti.write_nifti(dest / f"{m}.nii.gz", nifti.from_dhw(v), spacing=new_spacing, mask=(m == "seg"))


def _plan(release: dict, seed: int, compat_split: bool) -> list[tuple[Path, str]]:
    """(case folder, output split) for every case."""
    plan = [(c, "train") for c in _cases(release["train"])]
    if "test" in release:
        tests = {c.name: c for c in _cases(release["test"])}
        val, test_new = split_test(tests, seed, compat_split)
        plan += [(tests[n], "val") for n in val] + [(tests[n], "test_new") for n in test_new]
    else:
        log.warning("no test folder in the release: only train/ is written")
    return plan


def prepare_brainmetshare(raw, out, seed: int = 42, size: int = 256, depth: int = 150,
                          pad_to: int | None = None, compat_split: bool = False) -> Path:
    """Convert the raw release at ``raw`` into ``out/{train,val,test_new}/<case>/*.nii.gz``.

    ``out`` must be new or empty; results are assembled in a hidden folder inside it and moved
    into place at the end.
    """
    if size < 8 or depth < 1:
        raise UsageError(f"size must be >= 8 and depth >= 1, got {size}, {depth}", where="--size/--depth")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output folder exists and is not empty", where=out, hint="choose a new folder")
    plan = _plan(find_release(raw), seed, compat_split)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".prepare-tmp-{uuid.uuid4().hex[:8]}"
    try:
        for k, (case, split) in enumerate(plan, start=1):
            _write_case(case, staging / split / case.name, size, depth, pad_to, require_seg=(split == "train"))
            log.info("prepared %d/%d %s → %s", k, len(plan), case.name, split)
        for split in ("train", "val", "test_new"):
            if (staging / split).exists():
                (staging / split).rename(out / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
