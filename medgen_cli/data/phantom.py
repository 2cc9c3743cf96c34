"""Synthetic brain-MRI patients with metastases: a stand-in for BrainMetShare in tests and demos.

A patient is an ellipsoidal head (scalp/skull shell) around an ellipsoidal brain with a smooth grey/
white texture, two lateral ventricles, and 1–5 metastases. Each metastasis is an axis-aligned
ellipsoid centred on a voxel: a necrotic core, an enhancing rim, and surrounding oedema (oedema only
replaces brain tissue). ``seg`` = core ∪ rim. Tissue labels::

    0 background · 1 scalp/skull · 2 brain · 3 ventricles (CSF) · 4 oedema · 5 enhancing rim · 6 core

Contrast follows the real sequences: the rim is bright in bravo (T1 GRE post-contrast) and t1_gd but
not in t1_pre; oedema is bright in flair and darker than brain in the T1 sequences; CSF is dark in
every sequence (FLAIR suppresses fluid). A smooth multiplicative bias field and magnitude (|Gaussian|)
noise are added inside the head; the background stays exactly 0, as in skull-stripped data.

Tumour sizes follow a schedule keyed by the patient ``index`` (default: the seed): patient i gets
1 + i % 5 tumours, and the t-th tumour of the whole sequence falls in size bin t % 7, so any four
consecutive patients cover all seven bins. Each tumour is rescaled until its measured Feret diameter
(exact, on its own voxels) lies in the intended bin, so this holds at any resolution where the bin can
be represented (at 64×64×32 and above in practice; 32 px slices of 7.5 mm cannot hold every bin, and a
tumour that finds no room in a very thin brain is left out). Arrays are ``(H, W, D)`` = ``(x, y, z)``
on-disk order; spacing is ``(fov/size, fov/size, 1.0)`` mm.
"""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from . import nifti, sizebins
from .layout import IMAGE_MODALITIES

LABELS = {"background": 0, "skull": 1, "brain": 2, "csf": 3, "oedema": 4, "rim": 5, "core": 6}

# Mean intensity per label (index = label) and sequence, in raw scanner-like units.
CONTRAST = {  # bg, skull, brain, csf, oedema, rim, core
    "bravo": (0.0, 2500.0, 3200.0, 900.0, 2300.0, 6200.0, 1400.0),
    "t1_pre": (0.0, 800.0, 900.0, 300.0, 650.0, 850.0, 500.0),
    "t1_gd": (0.0, 850.0, 950.0, 320.0, 700.0, 1500.0, 520.0),
    "flair": (0.0, 350.0, 600.0, 120.0, 1150.0, 900.0, 800.0),
}
GREY_WHITE = {"bravo": 0.08, "t1_pre": 0.08, "t1_gd": 0.08, "flair": -0.06}  # texture sign/strength
NOISE = 0.025  # noise std as a fraction of the brain intensity
BIAS = 0.10  # bias field amplitude (multiplicative)


# ---------------------------------------------------------------------------------------------
# geometry helpers


class _Grid:
    """Voxel-centre coordinates in mm (relative to the volume centre) along x, y, z."""

    def __init__(self, size: int, depth: int, fov_mm: float):
        self.shape = (size, size, depth)
        self.spacing = (fov_mm / size, fov_mm / size, 1.0)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]

    def centre_mm(self, idx) -> np.ndarray:
        return np.array([ax[i] for ax, i in zip(self.axes, idx)])

    def broadcast(self, centre=(0.0, 0.0, 0.0), box=None):
        """Coordinates relative to ``centre`` as (H,1,1), (1,W,1), (1,1,D) arrays (within ``box``)."""
        box = box or tuple(slice(0, n) for n in self.shape)
        out = []
        for k, (ax, c, sl) in enumerate(zip(self.axes, centre, box)):
            shape = [1, 1, 1]
            shape[k] = -1
            out.append((ax[sl] - c).astype(np.float32).reshape(shape))
        return out


def _quad(coords, semi) -> np.ndarray:
    """Ellipsoid quadratic form Σ (c_k / a_k)²; ≤ 1 inside."""
    x, y, z = coords
    return (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2


def _smooth_1d(rng, coords: np.ndarray, period_mm: float) -> np.ndarray:
    """A smooth random function of one coordinate, roughly in [-1, 1]."""
    out = np.zeros_like(coords, dtype=np.float32)
    for k in (1, 2, 3):
        out += np.cos(2 * np.pi * k * coords / period_mm + rng.uniform(0, 2 * np.pi)) / k
    return out / 1.84


# ---------------------------------------------------------------------------------------------
# anatomy


def _anatomy(grid: _Grid, rng):
    """Labels (H, W, D) uint8 with head, brain and ventricles; returns (labels, brain semi-axes)."""
    fov = grid.spacing[0] * grid.shape[0]
    depth_mm = grid.shape[2] * grid.spacing[2]
    head = np.array([0.31 * fov, 0.39 * fov, min(70.0, 0.46 * depth_mm)]) * rng.uniform(0.95, 1.0, 3)
    skull = np.array([max(6.0, 1.2 * grid.spacing[0])] * 2 + [max(grid.spacing[2], min(6.0, 0.15 * head[2]))])
    brain = head - skull
    coords = grid.broadcast()
    labels = np.zeros(grid.shape, dtype=np.uint8)  # (H, W, D)
    labels[_quad(coords, head) <= 1] = LABELS["skull"]
    labels[_quad(coords, brain) <= 1] = LABELS["brain"]
    for side in (-1.0, 1.0):
        centre = (side * 0.13 * brain[0], 0.05 * brain[1], 0.1 * brain[2])
        semi = brain * np.array([0.09, 0.32, 0.28]) * rng.uniform(0.9, 1.1, 3)
        _paint(labels, grid, centre, semi, LABELS["csf"], only=LABELS["brain"])
    return labels, brain


def _box(grid: _Grid, centre, semi) -> tuple[slice, ...]:
    """Index box of the voxels whose centres may lie inside the ellipsoid."""
    box = []
    for ax, c, a in zip(grid.axes, centre, semi):
        lo, hi = np.searchsorted(ax, [c - a, c + a])
        box.append(slice(int(lo), int(hi) + 1))
    return tuple(box)


def _paint(labels, grid, centre, semi, value, only=None, scale=1.0):
    """Set ``value`` inside the ellipsoid (optionally only over voxels labelled ``only``)."""
    box = _box(grid, centre, np.asarray(semi) * scale)
    inside = _quad(grid.broadcast(centre, box), np.asarray(semi) * scale) <= 1.0
    region = labels[box]
    if only is not None:
        inside &= region == only
    region[inside] = value


# ---------------------------------------------------------------------------------------------
# tumours


def _schedule(index: int) -> list[int]:
    """Size bins of patient ``index``'s tumours: 1 + index % 5 of them, continuing a t % 7 cycle."""
    r = index % 5
    first = 15 * (index // 5) + r * (r + 1) // 2  # tumours of all earlier patients
    return [(first + k) % sizebins.N_BINS for k in range(1 + r)]


def _bin_range(b: int) -> tuple[float, float]:
    edges = (*sizebins.BIN_EDGES_MM, 45)
    return float(edges[b]), float(edges[b + 1])


def _rasterised_feret(semi, spacing) -> float:
    """Feret diameter (mm) of the voxel centres inside an ellipsoid centred on a voxel."""
    axes = [np.arange(-int(a // s), int(a // s) + 1) * s for a, s in zip(semi, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    coords = np.argwhere(inside)
    return sizebins.feret_diameter(coords, spacing)


def _size_tumour(rng, b: int, brain, spacing) -> np.ndarray:
    """Semi-axes (mm) of a tumour whose rasterised Feret diameter falls in bin ``b``."""
    lo, hi = _bin_range(b)
    target = rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
    shape = np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)])
    shape = shape[rng.permutation(3)] * target / 2.0
    limit = np.asarray(brain) * np.array([0.6, 0.6, 0.7])
    s, s_lo, s_hi = 1.0, 0.05, 8.0
    for _ in range(24):
        semi = np.minimum(shape * s, limit)
        d = _rasterised_feret(semi, spacing)
        if lo <= d < hi:
            break
        s_lo, s_hi = (s, s_hi) if d < lo else (s_lo, s)
        s = math.sqrt(s_lo * s_hi)
    return semi


def _place(rng, semi, brain, grid: _Grid, placed) -> np.ndarray | None:
    """A voxel index for the tumour centre inside the brain, apart from placed tumours."""
    gap = 1.01 * max(grid.spacing)  # > one voxel step: no two tumours touch (face connectivity)
    radius = float(np.max(semi))
    for _ in range(1000):
        c = rng.uniform(-1, 1, 3) * brain
        idx = tuple(int(np.argmin(np.abs(ax - v))) for ax, v in zip(grid.axes, c))
        cm = grid.centre_mm(idx)
        if np.sum(((np.abs(cm) + semi) / brain) ** 2) > 1.0:
            continue
        if all(np.linalg.norm(cm - p) >= radius + r + gap for p, r in placed):
            return np.array(idx)
    return None


def _add_tumours(labels, grid: _Grid, brain, bins, rng) -> None:
    """Size, place and paint every tumour: oedema first, then rim and core on top."""
    sized = sorted((_size_tumour(rng, b, brain, grid.spacing) for b in bins), key=lambda s: -s.max())
    placed, tumours = [], []
    for semi in sized:
        idx = _place(rng, semi, brain, grid, placed)
        if idx is None:  # no room left (tiny volumes): skip rather than overlap
            continue
        placed.append((grid.centre_mm(idx), float(np.max(semi))))
        tumours.append((grid.centre_mm(idx), semi, rng.uniform(0.35, 0.65), rng.uniform(1.5, 2.2)))
    for centre, semi, _, oedema in tumours:
        _paint(labels, grid, centre, semi, LABELS["oedema"], only=LABELS["brain"], scale=oedema)
    for centre, semi, core, _ in tumours:
        _paint(labels, grid, centre, semi, LABELS["rim"])
        _paint(labels, grid, centre, semi, LABELS["core"], scale=core)


# ---------------------------------------------------------------------------------------------
# intensities


def _fields(grid: _Grid, rng):
    """(grey/white texture, bias field), each a smooth (H, W, D) float32 field from 1-D factors."""
    x, y, z = grid.broadcast()
    tex = (_smooth_1d(rng, x, 40.0) * _smooth_1d(rng, y, 40.0)
           + _smooth_1d(rng, y, 35.0) * _smooth_1d(rng, z, 35.0)) / 2.0  # (H, W, D)
    bias = ((1 + BIAS * _smooth_1d(rng, x, 400.0)) * (1 + BIAS * _smooth_1d(rng, y, 400.0))
            * (1 + 0.5 * BIAS * _smooth_1d(rng, z, 300.0)))  # (H, W, D)
    return tex.astype(np.float32), bias.astype(np.float32)


def _render(labels, modality: str, tex_brain, bias, head, rng) -> np.ndarray:
    """One sequence: label means × texture × bias + |noise| inside the head → float32 (H, W, D)."""
    lut = np.asarray(CONTRAST[modality], dtype=np.float32)
    vol = lut[labels] * (1.0 + GREY_WHITE[modality] * tex_brain) * bias  # (H, W, D)
    noise = rng.standard_normal(labels.shape, dtype=np.float32) * (NOISE * lut[LABELS["brain"]])
    return np.abs(vol + noise * head).astype(np.float32)


def synth_patient(seed: int, size: int = 256, depth: int = 150, fov_mm: float = 240.0, index: int | None = None):
    """One phantom patient → (volumes {bravo, t1_pre, t1_gd, flair}: float32 (H, W, D),
    seg uint8 (H, W, D), labels uint8 (H, W, D)). Deterministic in (seed, index, size, depth, fov)."""
    if seed < 0 or (index is not None and index < 0):
        raise UsageError("seed and index must be non-negative", where="seed")
    rng = np.random.default_rng(seed)
    grid = _Grid(size, depth, fov_mm)
    labels, brain = _anatomy(grid, rng)
    _add_tumours(labels, grid, brain, _schedule(seed if index is None else index), rng)
    tex, bias = _fields(grid, rng)
    tex_brain = tex * (labels == LABELS["brain"])  # (H, W, D)
    head = (labels > 0).astype(np.float32)  # (H, W, D)
    volumes = {m: _render(labels, m, tex_brain, bias, head, rng) for m in IMAGE_MODALITIES}
    seg = ((labels == LABELS["rim"]) | (labels == LABELS["core"])).astype(np.uint8)
    return volumes, seg, labels


def spacing(size: int = 256, fov_mm: float = 240.0) -> tuple[float, float, float]:
    """(x, y, z) voxel size of a phantom: (fov/size, fov/size, 1.0) mm."""
    return fov_mm / size, fov_mm / size, 1.0


# ---------------------------------------------------------------------------------------------
# dataset


def _patient_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _check_args(counts, size: int, depth: int) -> None:
    if any(n < 0 for n in counts) or sum(counts) == 0:
        raise UsageError(f"patient counts must be >= 0 with at least one patient, got {counts}",
                         where="--n-train/--n-val/--n-test")
    if size < 8 or depth < 4:
        raise UsageError(f"phantoms need size >= 8 and depth >= 4, got size {size}, depth {depth}",
                         where="--size/--depth")


def _write_patient(folder: Path, seed: int, index: int, size: int, depth: int, fov_mm: float) -> None:
    volumes, seg, _ = synth_patient(seed, size, depth, fov_mm, index=index)
    affine = nifti.affine_from_spacing(spacing(size, fov_mm))
    for m, vol in volumes.items():
        nifti.write_nifti(folder / f"{m}.nii.gz", vol, affine=affine, mask=False)
    nifti.write_nifti(folder / "seg.nii.gz", seg, affine=affine, mask=True)


def synth_dataset(out, n_train: int = 6, n_val: int = 2, n_test: int = 2, size: int = 256,
                  depth: int = 150, seed: int = 0, overwrite: bool = False, fov_mm: float = 240.0) -> Path:
    """Write a phantom dataset in the medgen layout (patients ``Phantom_001``…, numbered across
    splits). A non-empty ``out`` is refused unless ``overwrite``, which replaces only its
    train/val/test_new folders. Patients are built in a hidden folder inside ``out`` and moved
    into place at the end, so an interrupted run leaves the old content untouched."""
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test_new": n_test}
    _check_args(tuple(counts.values()), size, depth)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError("output folder exists and is not empty", where=out,
                         hint="choose a new folder, or pass --overwrite to replace its train/val/test_new")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".synth-tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_all(staging, counts, seed, size, depth, fov_mm)
        for split in counts:
            shutil.rmtree(out / split, ignore_errors=True)
            if (staging / split).exists():
                (staging / split).rename(out / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_all(staging: Path, counts: dict, seed: int, size: int, depth: int, fov_mm: float) -> None:
    k = 0
    for split, n in counts.items():
        for _ in range(n):
            folder = staging / split / f"Phantom_{k + 1:03d}"
            _write_patient(folder, _patient_seed(seed, k), k, size, depth, fov_mm)
            k += 1
