"""`medgen sample`: load a checkpoint, draw noise per output index, integrate, write NIfTI + PNG.

Bravo-mode models are conditioned on the first n masks of a split (sorted patients; in 2D the
first n kept slices), noise of output i from seed + i (the reference protocol), so the same index
gives the same sample whatever the batch size. Output i goes to OUT/<i:05d>/<modality>.nii.gz
(with the conditioning mask beside it as seg.nii.gz), so the folder is itself a dataset split.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import records
from ..errors import InputError, UsageError
from . import build

log = logging.getLogger("medgen")
FOV_MM = 240.0


@dataclass
class Condition:
    cond: np.ndarray  # (C_cond, ...) model-space condition, possibly 0 channels
    path: str | None  # mask file it came from
    spacing: tuple[float, float, float]  # (x, y, z) mm of the model-space grid
    depth: int | None  # 3D: slices to keep on output
    affine: np.ndarray | None = None


def finish(arr: np.ndarray, is_seg: bool) -> np.ndarray:
    """Model output -> image in [0, 1], or a binary mask (threshold 0.5) for seg models."""
    return (arr > 0.5).astype(np.float32) if is_seg else np.clip(arr, 0.0, 1.0)


def checkpoint_ref(run: str | None) -> str:
    if run is None:
        raise UsageError("no model given", "--run", "pass --run RUN_DIR (or '-' to read checkpoint records)")
    if run != "-":
        return run
    recs = [r for r in records.parse_lines(sys.stdin) if r["kind"] == "checkpoint"]
    if not recs:
        raise InputError("no checkpoint record on stdin", "--run -", "pipe `medgen train --json` into it")
    return recs[-1]["path"]


def _spacing(path: Path, override, size_hw: tuple[int, int], image_size: int) -> tuple[float, float, float]:
    import nibabel as nib

    zooms = tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])
    sx, sy, sz = override if override else (zooms + (1.0, 1.0, 1.0))[:3]
    return (sx * size_hw[0] / image_size, sy * size_hw[1] / image_size, sz)


def conditions(preset, root: Path | None, split: str, n: int) -> list[Condition]:
    d = preset.data
    if d.mode == "seg":
        sp = (FOV_MM / d.image_size, FOV_MM / d.image_size, 1.0)
        empty = np.zeros((0,) + ((d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to,) + (d.image_size,) * 2),
                         np.float32)
        return [Condition(empty, None, sp, d.depth if d.dims == 3 else None)] * n
    if root is None:
        raise UsageError("bravo models are conditioned on masks: no dataset given", "--data",
                         "pass --data DIR (the masks of its --split are used)")
    return _slice_conditions(preset, root, split, n) if d.dims == 2 else _volume_conditions(preset, root, split, n)


def _volume_conditions(preset, root, split, n) -> list[Condition]:
    import nibabel as nib

    from ..data.datasets import load_patient
    from ..data.layout import patients

    d, out = preset.data, []
    pats = patients(root, split)[:n]
    if len(pats) < n:
        raise InputError(f"split '{split}' has {len(pats)} masks, {n} samples asked", str(root / split),
                         f"use --n {len(pats)} or another --split")
    for p in pats:
        seg = load_patient(p, ["seg"], d.image_size, d.normalization, pad_depth_to=d.pad_depth_to,
                           pad_mode=d.pad_mode, cache_dir=d.cache_dir)["seg"]  # (D, H, W)
        img = nib.load(str(p / "seg.nii.gz"))
        h, w, depth = img.shape[:3]
        out.append(Condition(seg[None], str(p / "seg.nii.gz"), _spacing(p / "seg.nii.gz", d.spacing, (h, w),
                                                                         d.image_size), depth))
    return out


def _slice_conditions(preset, root, split, n) -> list[Condition]:
    ds = build.build_dataset(preset, split, root)
    if len(ds) < n:
        raise InputError(f"split '{split}' has {len(ds)} usable slices, {n} samples asked", str(root / split),
                         f"use --n {len(ds)}")
    out = []
    for i in range(n):
        it = ds[i]
        mask = Path(root) / split / it["patient"] / "seg.nii.gz"
        import nibabel as nib

        h, w = nib.load(str(mask)).shape[:2]
        sp = _spacing(mask, preset.data.spacing, (h, w), preset.data.image_size)
        out.append(Condition(it["cond"].numpy(), f"{mask}#slice={it['slice']}", sp, None))
    return out


def _out_dir(out: Path | None, step_dir: Path, solver: str, steps: int) -> Path:
    if out is None:
        run = step_dir.parent.parent if step_dir.parent.name == "ckpt" else step_dir.parent
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = run / "samples" / f"{step_dir.name}-{solver}{steps}-{stamp}"
    if out.exists() and not out.is_dir():
        raise InputError(f"output path is a file: {out}", "--out", "give a folder path")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}", "--out", "choose a new folder; nothing was written")
    return out


def run(run_ref, out, opts, data, device, dry_run):
    import torch

    from .. import checkpoint as ckpt
    from ..config import validate
    from ..engine.sampling import generate
    from ..runtime import autocast, pick_device

    ref = checkpoint_ref(run_ref)
    so = {k: v for k, v in opts.items() if v is not None}
    weights, which = so.pop("weights", None), so.pop("which", None)
    ck = ckpt.load_checkpoint(ref, which or "best", weights or "ema")
    preset = validate(ck.config, where=str(ck.step_dir))
    sc = preset.sample.model_copy(update=so)
    if sc.solver is None:
        sc.solver = "ddim" if preset.diffusion.kind == "ddpm" else "euler"
    strategy = build.build_strategy(preset)
    _check_solver(preset, sc.solver)
    out = _out_dir(Path(out) if out else None, Path(ck.step_dir), sc.solver, sc.steps)
    root = Path(data) if data else (Path(preset.data.root) if preset.data.root else None)
    conds = conditions(preset, root, sc.split, sc.n)
    if dry_run:
        yield {"kind": "config", "checkpoint": str(ck.step_dir), "out": str(out), "sample": sc.model_dump()}, \
            f"would write {sc.n} samples to {out}"
        return
    dev = pick_device(device or preset.train.device)
    model = build.build_model(preset)
    model.load_state_dict(ck.model_state)
    model.to(dev).eval()
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for start in range(0, sc.n, sc.batch_size):
        idx = list(range(start, min(start + sc.batch_size, sc.n)))
        cond = torch.from_numpy(np.stack([conds[i].cond for i in idx])).to(dev)
        noise = _noise(preset, idx, sc.seed, dev)
        x, nfe = generate(model, strategy, noise, cond, sc.solver, sc.steps, autocast(dev, preset.train.precision))
        for j, i in enumerate(idx):
            rec = _write(out, i, x[j, 0].cpu().numpy(), conds[i], preset, sc, ck, root, nfe)
            with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
                fh.write(records.dumps(rec) + "\n")
            yield rec, rec["path"]


def _check_solver(preset, solver: str) -> None:
    if preset.diffusion.kind == "ddpm" and solver != "ddim":
        raise UsageError(f"DDPM models sample with DDIM, not '{solver}'", "--solver", "use --solver ddim")
    if preset.diffusion.kind == "rflow":
        from ..solvers import get_solver

        get_solver(solver)


def _noise(preset, idx: list[int], seed: int, dev):
    import torch

    d = preset.data
    img, _ = preset.channels()
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    draws = [torch.randn((img, *spatial), generator=torch.Generator().manual_seed(seed + i)) for i in idx]
    return torch.stack(draws).to(dev)  # (B, C, ...)


def _write(out: Path, i: int, arr: np.ndarray, c: Condition, preset, sc, ck, root, nfe) -> dict:
    from ..data.nifti import write_nifti
    from ..previews import save_png, view

    is_seg = preset.data.mode == "seg"
    arr = finish(arr, is_seg)  # (H, W) or (D, H, W)
    if arr.ndim == 3:
        arr = arr[: c.depth]
    folder = out / f"{i:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    modality = "seg" if is_seg else "bravo"
    disk = np.transpose(arr, (1, 2, 0)) if arr.ndim == 3 else arr  # (H, W, D) or (H, W)
    path = write_nifti(folder / f"{modality}.nii.gz", disk.astype(np.uint8) if is_seg else disk, spacing=c.spacing)
    if c.cond.shape[0]:
        m = c.cond[0][: c.depth] if arr.ndim == 3 else c.cond[0]
        m = np.transpose(m, (1, 2, 0)) if m.ndim == 3 else m
        write_nifti(folder / "seg.nii.gz", (m > 0.5).astype(np.uint8), spacing=c.spacing)
    save_png(out / "previews" / f"{i:05d}.png", view(arr))
    return records.make(
        "sample", path=str(path), run=str(Path(ck.step_dir).parent.parent), checkpoint=str(ck.step_dir),
        weights=ck.weights, seed=sc.seed, index=i, solver=sc.solver, steps=sc.steps, nfe=nfe, cfg=sc.cfg,
        condition=c.path, modality=modality, shape=list(disk.shape), spacing=list(c.spacing),
        data_root=str(root) if root else None, split=sc.split if c.path else None)
