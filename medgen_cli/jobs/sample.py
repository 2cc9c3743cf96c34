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
    meta: dict | None = None  # extra record fields (size bins, multi-mode modality)


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


def model_grid(path: Path, override, image_size: int) -> tuple[tuple[float, float, float], np.ndarray]:
    """(x, y, z) spacing and affine of a source file's grid after the in-plane resize to image_size.

    The source affine keeps its orientation and origin; its x/y columns are scaled by old/new size
    and the origin moves to the centre of the new first voxel. `override` (data.spacing) replaces
    the header's voxel sizes first (the reference's files carry identity affines).
    """
    import nibabel as nib

    img = nib.load(str(path))
    aff = np.array(img.affine, dtype=np.float64)
    if override:
        for k in range(3):
            col = aff[:3, k]
            aff[:3, k] = col / (np.linalg.norm(col) or 1.0) * override[k]
    for k, old in enumerate(img.shape[:2]):
        scale = old / image_size
        aff[:3, 3] += aff[:3, k] * (scale - 1) / 2  # centre of the new first voxel
        aff[:3, k] *= scale
    spacing = tuple(float(np.linalg.norm(aff[:3, k])) for k in range(3))
    return spacing, aff


def conditions(preset, root: Path | None, split: str, n: int, bins=None, modality=None) -> list[Condition]:
    d = preset.data
    # --- controlnet: a stage-1 model is unconditional (no mask needed, none written) ---
    if preset.controlnet.stage == 1:
        plain = preset.model_copy(update={"data": d.model_copy(update={"mode": "seg"}),
                                          "controlnet": preset.controlnet.model_copy(update={"stage": 0})})
        return conditions(plain, root, split, n)
    if d.mode in BIN_MODES or d.mode == "multi":
        return _mode_conditions(preset, root, split, n, bins, modality)
    if d.mode == "seg":
        sp = (FOV_MM / d.image_size, FOV_MM / d.image_size, 1.0)
        empty = np.zeros((0,) + ((d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to,) + (d.image_size,) * 2),
                         np.float32)
        return [Condition(empty, None, sp, d.depth if d.dims == 3 else None)] * n
    if root is None:
        raise UsageError("bravo models are conditioned on masks: no dataset given", "--data",
                         "pass --data DIR (the masks of its --split are used)")
    return _slice_conditions(preset, root, split, n) if d.dims == 2 else _volume_conditions(preset, root, split, n)


# ---- modes & conditioning: size-bin and multi-modality conditions ----------------------------
BIN_MODES = ("seg_conditioned", "seg_conditioned_input")
MASK_MODES = ("bravo", "dual", "multi")  # modes conditioned on a mask (written beside each output)
MULTI_MODALITIES = ("bravo", "flair", "t1_pre", "t1_gd")  # mode ids 0..3


def output_modalities(preset, c: Condition | None = None) -> tuple[str, ...]:
    """File names of the output channels."""
    mode = preset.data.mode
    if mode == "dual":
        return ("t1_pre", "t1_gd")
    if mode == "multi":
        return ((c.meta or {}).get("modality", "bravo"),) if c is not None else ("bravo",)
    return ("seg",) if mode == "seg" or mode in BIN_MODES else ("bravo",)


def parse_bins(value, max_count: int) -> list[int] | None:
    """``--bins 1,0,2,0,0,0,0`` → 7 tumour counts per size bin (0-3, 3-6, 6-10, 10-15, 15-20, 20-30, >=30 mm)."""
    if value is None:
        return None
    try:
        bins = [int(v) for v in str(value).split(",")]
    except ValueError:
        bins = []
    if len(bins) != 7 or any(b < 0 or b > max_count for b in bins):
        raise UsageError(f"--bins takes 7 counts in 0..{max_count}, got '{value}'", "--bins",
                         "e.g. --bins 1,0,2,0,0,0,0 (bins 0-3, 3-6, 6-10, 10-15, 15-20, 20-30, >=30 mm)")
    return bins


def _spatial(d) -> tuple[int, ...]:
    return (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)


def _mode_conditions(preset, root, split, n, bins, modality) -> list[Condition]:
    """seg_conditioned*: ``bins`` for every output, else the bins of the split's first n masks (the
    seg-positive slices in 2D). multi: the split's first n masks (as bravo mode) + ``modality``'s id."""
    from ..data.datasets import bin_maps, mode_maps

    d = preset.data
    if d.mode == "multi":
        modality = modality or "bravo"
        if modality not in MULTI_MODALITIES:
            raise UsageError(f"unknown modality '{modality}'", "--modality", f"choose {', '.join(MULTI_MODALITIES)}")
        base = conditions(preset.model_copy(update={"data": d.model_copy(update={"mode": "bravo"})}), root, split, n)
        out = []
        for c in base:
            maps = mode_maps(MULTI_MODALITIES.index(modality), c.cond.shape[1:]).numpy()
            out.append(Condition(np.concatenate([c.cond[:1], maps]), c.path, c.spacing, c.depth, c.affine,
                                 {"modality": modality}))
        return out
    if modality is not None:
        raise UsageError("--modality chooses the output of multi-mode models", "--modality", "drop --modality")
    sp = (FOV_MM / d.image_size, FOV_MM / d.image_size, 1.0)
    depth = d.depth if d.dims == 3 else None
    if bins is not None:
        maps = bin_maps(bins, _spatial(d), preset.conditioning.max_count).numpy()
        return [Condition(maps, None, sp, depth, None, {"bins": list(bins)})] * n
    if root is None:
        raise UsageError("size-bin models need bins: none given", "--bins",
                         "pass --bins 1,0,2,0,0,0,0, or --data DIR to take the bins of its --split masks")
    out = []
    for it, mask in _first_items(preset, root, split, n):
        where = f"{mask}#slice={it['slice']}" if d.dims == 2 else str(mask)
        out.append(Condition(it["cond"].numpy(), where, sp, depth, None, {"bins": it["bins"].tolist()}))
    return out


def _first_items(preset, root, split: str, n: int):
    """The split's first n dataset items (the reference's conditioning protocol) with their mask files."""
    ds = build.build_dataset(preset, split, root)
    if len(ds) < n:
        raise InputError(f"split '{split}' has {len(ds)} usable items, {n} samples asked", str(root / split),
                         f"use --n {len(ds)} or another --split")
    for i in range(n):
        it = ds[i]
        yield it, Path(root) / split / it["patient"] / "seg.nii.gz"


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
        depth = nib.load(str(p / "seg.nii.gz")).shape[2]
        sp, aff = model_grid(p / "seg.nii.gz", d.spacing, d.image_size)
        out.append(Condition(seg[None], str(p / "seg.nii.gz"), sp, depth, aff))
    return out


def _slice_conditions(preset, root, split, n) -> list[Condition]:
    out = []
    for it, mask in _first_items(preset, root, split, n):
        sp, aff = model_grid(mask, preset.data.spacing, preset.data.image_size)
        out.append(Condition(it["cond"].numpy(), f"{mask}#slice={it['slice']}", sp, None, aff))
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


def _load(ref: str, which, weights):
    from .. import checkpoint as ckpt
    from ..config import validate

    ck = ckpt.load_checkpoint(ref, which or "best", weights or "ema")
    return ck, validate(ck.config, where=str(ck.step_dir))


def _parse_restart(value) -> tuple[int, int, float, float] | None:
    if value is None or isinstance(value, (tuple, list)):
        return tuple(value) if value is not None else None
    parts = str(value).split(",")
    try:
        k, n, lo, hi = int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3])
        if len(parts) != 4:
            raise ValueError
    except (ValueError, IndexError):
        raise UsageError(f"--restart takes K,n,t_min,t_max, got '{value}'", "--restart",
                         "e.g. --restart 2,5,0.1,0.3 (2 restarts of 5 Euler steps in [0.1, 0.3])")
    return k, n, lo, hi


def _parse_grid(value):
    if value is None or value in ("train", "uniform") or isinstance(value, float):
        return value
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"unknown time grid '{value}'", "--grid", "use train, uniform or a shift ratio such as 2")


def sample_options(preset, opts: dict):
    """The preset's [sample] with the command-line options applied and checked against the model."""
    so = {k: v for k, v in opts.items() if v is not None and k not in ("weights", "which")}
    if "restart" in so:
        so["restart"] = _parse_restart(so["restart"])
    if "grid" in so:
        so["grid"] = _parse_grid(so["grid"])
    try:
        sc = preset.sample.model_validate({**preset.sample.model_dump(), **so})
    except Exception as e:  # pydantic ValidationError: a bad option value
        raise UsageError(f"invalid sampling option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}"
                         if hasattr(e, "errors") else str(e), "medgen sample", "see medgen sample --help")
    if sc.solver is None:
        sc.solver = "ddim" if preset.diffusion.kind == "ddpm" else "euler"
    check_plan(preset, sc)
    return sc


def check_plan(preset, sc) -> None:
    """Refuse combinations that cannot work, before any model is loaded."""
    _check_solver(preset, sc.solver)
    from ..solvers import ADAPTIVE

    if (sc.atol is not None or sc.rtol is not None) and sc.solver not in ADAPTIVE:
        raise UsageError(f"--atol/--rtol apply to adaptive solvers, not '{sc.solver}'", "--atol/--rtol",
                         f"drop them, or use one of: {', '.join(ADAPTIVE)}")
    if sc.restart is not None:
        k, n, lo, hi = sc.restart
        if preset.diffusion.kind != "rflow" or sc.solver != "euler":
            raise UsageError("Restart runs on rectified-flow models with the Euler solver", "--restart",
                             "use --solver euler with an rflow model, or drop --restart")
        if k < 0 or n < 1 or not 0.0 <= lo < hi < 1.0:
            raise UsageError(f"--restart needs K >= 0, n >= 1, 0 <= t_min < t_max < 1, got {sc.restart}",
                             "--restart", "e.g. --restart 2,5,0.1,0.3")
    if sc.grid != "train" and preset.diffusion.kind != "rflow":
        raise UsageError("--grid applies to rectified-flow models (DDPM uses the DDIM grid)", "--grid",
                         "drop --grid for DDPM models")
    guided = sc.cfg != 1.0 or (sc.cfg_end is not None and sc.cfg_end != 1.0)
    if guided:
        if preset.data.mode == "seg":
            raise UsageError("seg models are unconditional: classifier-free guidance has nothing to guide",
                             "--cfg", "drop --cfg/--cfg-end for seg models")
        if preset.controlnet.stage == 1:  # controlnet
            raise UsageError("ControlNet stage-1 models are unconditional: classifier-free guidance has nothing "
                             "to guide", "--cfg", "drop --cfg/--cfg-end, or sample the stage-2 run")
        if not _trained_with_dropout(preset):
            log.warning("warning: this model was trained without condition dropout, so its unconditional "
                        "branch (seg channel zeroed) never saw training data; guidance extrapolates from it")


def _trained_with_dropout(preset) -> bool:
    """True when the run's training dropped the condition (a key the trainer may add later)."""
    return float(getattr(preset.train, "cond_dropout", 0.0) or 0.0) > 0.0


def make_plan(sc):
    from ..engine.sampling import Guidance, Plan, Restart

    shift = None if sc.grid == "train" else (1.0 if sc.grid == "uniform" else float(sc.grid))
    return Plan(solver=sc.solver, steps=sc.steps, atol=sc.atol, rtol=sc.rtol, shift=shift,
                guidance=Guidance(sc.cfg, sc.cfg_end), restart=Restart(*sc.restart) if sc.restart else None)


def _build(preset, ck, dev, fast: bool = False):
    """The trained network on ``dev`` and its strategy; ``fast``: behind the compiled fast path
    (engine/fastpath.py: bf16 weights, channels-last, torch.compile, CUDA graphs)."""
    model = build.build_model(preset)
    model.load_state_dict(ck.model_state)
    model = model.to(dev).eval()
    if fast:
        from ..engine.fastpath import FastNet

        model = FastNet(model, dev)
    return model, build.build_strategy(preset)


def generate_items(model, strategy, preset, sc, conds, idx, dev, noise=None):
    """Samples of output indices ``idx`` conditioned on ``conds`` (one per index): (x (B, C, ...), nfe list, batched)."""
    import torch

    from ..engine.sampling import sample_batch
    from ..runtime import autocast

    cond = torch.from_numpy(np.stack([c.cond for c in conds])).to(dev)
    noise = _noise(preset, idx, sc.seed, dev) if noise is None else noise
    dtype = torch.bfloat16 if sc.state_dtype == "bf16" else None
    out = sample_batch(model, strategy, noise, cond, make_plan(sc), keys=[(sc.seed, i) for i in idx],
                       autocast=autocast(dev, preset.train.precision), state_dtype=dtype,
                       space=build.build_space(preset))  # spaces.py: decoded to pixels
    return out


def run(run_ref, out, opts, data, device, dry_run, paired=None):
    from ..runtime import pick_device

    ref = checkpoint_ref(run_ref)
    ck, preset = _load(ref, opts.get("weights"), opts.get("which"))
    opts = dict(opts)
    # --- DiffRS: pop --diffrs* options (engine/diffrs.py) ---
    from ..engine import diffrs as rs

    rs_opts = rs.pop_options(opts, paired)
    bins_text = opts.pop("bins", None)
    modality = opts.pop("modality", None)
    if paired is not None:  # --bins then conditions the mask model
        sc = sample_options(preset, opts)
        yield from run_paired(ck, preset, sc, out, data, device, dry_run, opts, bins=bins_text, **paired)
        return
    bins = parse_bins(bins_text, preset.conditioning.max_count)  # modes & conditioning
    if bins is not None and preset.data.mode not in BIN_MODES:
        raise UsageError(f"--bins conditions size-bin models, this one is '{preset.data.mode}'", "--bins",
                         "drop --bins")
    sc = sample_options(preset, opts)
    if rs_opts is not None:  # DiffRS
        rs.check_plan(preset, sc)
        if sc.compile:
            raise UsageError("--compile does not apply to DiffRS (its head reads the UNet's inner features)",
                             "--compile", "drop --compile, or sample without --diffrs")
    out = _out_dir(Path(out) if out else None, Path(ck.step_dir), sc.solver, sc.steps)
    root = Path(data) if data else (Path(preset.data.root) if preset.data.root else None)
    conds = conditions(preset, root, sc.split, sc.n, bins, modality)
    if dry_run:
        yield {"kind": "config", "checkpoint": str(ck.step_dir), "out": str(out), "sample": sc.model_dump()}, \
            f"would write {sc.n} samples to {out}"
        return
    dev = pick_device(device or preset.train.device)
    model, strategy = _build(preset, ck, dev, fast=sc.compile)
    sampler = None if rs_opts is None else rs.DiffRSSampler(rs_opts[0], model, strategy, preset, sc, rs_opts[1], dev,
                                                            ck.step_dir)  # DiffRS
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for start in range(0, sc.n, sc.batch_size):
        idx = list(range(start, min(start + sc.batch_size, sc.n)))
        if sampler is None:
            res = generate_items(model, strategy, preset, sc, [conds[i] for i in idx], idx, dev)
        else:  # DiffRS
            res = sampler.generate([conds[i] for i in idx], idx, build.space_shape(preset), conds)
        for j, i in enumerate(idx):
            for ch, modality in enumerate(output_modalities(preset, conds[i])):  # dual: one record per file
                rec = _write(out, i, res.x[j, ch].cpu().numpy(), conds[i], preset, sc, ck, root, res.nfe[j],
                             res.cfg_batched, modality=modality,
                             extra={**{k: v for k, v in (conds[i].meta or {}).items() if k != "modality"},
                                    **(sampler.record(res, j) if sampler else {})})
                with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(records.dumps(rec) + "\n")
                yield rec, rec["path"]


def _check_solver(preset, solver: str) -> None:
    if preset.diffusion.kind == "ddpm" and solver != "ddim":
        raise UsageError(f"DDPM models sample with DDIM, not '{solver}'", "--solver", "use --solver ddim")
    if preset.diffusion.kind == "rflow":
        from ..solvers import get_solver

        if solver == "ddim":
            raise UsageError("DDIM is for DDPM models", "--solver", "use euler (or another ODE solver) for rflow")
        get_solver(solver)


def _noise(preset, idx: list[int], seed: int, dev):
    import torch

    shape = build.space_shape(preset)  # (C, *spatial) in the model's space (pixels unless [space] says)
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx]
    return torch.stack(draws).to(dev)  # (B, C, ...)


def _write(out: Path, i: int, arr: np.ndarray, c: Condition, preset, sc, ck, root, nfe, cfg_batched=False,
           folder: Path | None = None, as_volume: bool = False, extra: dict | None = None,
           modality: str | None = None) -> dict:
    from ..data.nifti import write_nifti
    from ..previews import save_png, view

    is_seg = preset.data.mode == "seg" or preset.data.mode in BIN_MODES
    arr = finish(arr, is_seg)  # (H, W) or (D, H, W)
    if arr.ndim == 3:
        arr = arr[: c.depth]
    folder = folder or out / f"{i:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    modality = modality or ("seg" if is_seg else "bravo")
    disk = np.transpose(arr, (1, 2, 0)) if arr.ndim == 3 else arr  # (H, W, D) or (H, W)
    if as_volume and disk.ndim == 2:
        disk = disk[..., None]  # (H, W, 1): a dataset file is always a volume
    geo = {"affine": c.affine} if c.affine is not None else {"spacing": c.spacing}  # the mask's grid, else FOV
    path = write_nifti(folder / f"{modality}.nii.gz", disk.astype(np.uint8) if is_seg else disk, **geo)
    if c.cond.shape[0] and preset.data.mode in MASK_MODES:
        m = c.cond[0][: c.depth] if arr.ndim == 3 else c.cond[0]
        m = np.transpose(m, (1, 2, 0)) if m.ndim == 3 else m
        m = m[..., None] if as_volume and m.ndim == 2 else m
        write_nifti(folder / "seg.nii.gz", (m > 0.5).astype(np.uint8), **geo)
    save_png(out / "previews" / (f"{i:05d}.png" if modality in ("bravo", "seg") else f"{i:05d}-{modality}.png"),
             view(arr))
    return records.make(
        "sample", path=str(path), run=str(Path(ck.step_dir).parent.parent), checkpoint=str(ck.step_dir),
        weights=ck.weights, seed=sc.seed, index=i, solver=sc.solver, steps=sc.steps, nfe=nfe, cfg=sc.cfg,
        condition=c.path, modality=modality, shape=list(disk.shape), spacing=list(c.spacing),
        data_root=str(root) if root else None, split=sc.split if c.path else None,
        cfg_end=sc.cfg_end, cfg_batched=cfg_batched, model_evals=nfe * (2 if cfg_batched else 1),
        atol=sc.atol, rtol=sc.rtol, grid=sc.grid, restart=list(sc.restart) if sc.restart else None,
        state_dtype=sc.state_dtype, fast_path=sc.compile, **(extra or {}))  # fast_path: bf16 weights


# ---- paired mask -> image datasets ------------------------------------------------------------------
STREAM_MASK = 0x4D41534B  # keyed noise of mask attempt r of output i: (seed, STREAM_MASK, i, r)


def _plain_record(kind: str, **fields) -> dict:
    from .. import __version__

    return {"schema": records.SCHEMA, "kind": kind, "medgen_version": __version__, **fields}


def _mask_model(mask_run: str, preset, sc, opts, mask_steps):
    mck, mpreset = _load(checkpoint_ref(mask_run), opts.get("weights"), opts.get("which"))
    if mpreset.data.mode != "seg" and mpreset.data.mode not in BIN_MODES:
        raise UsageError(f"--mask-run must be a mask model, this one is '{mpreset.data.mode}'", "--mask-run",
                         "pass a run trained with data.mode = \"seg\" or a size-bin conditioned seg mode")
    a, b = mpreset.data, preset.data
    if (a.dims, a.image_size) != (b.dims, b.image_size) or (a.dims == 3 and a.pad_depth_to != b.pad_depth_to):
        raise UsageError(f"mask model makes {a.dims}D {a.image_size}px (depth {a.pad_depth_to}), image model "
                         f"expects {b.dims}D {b.image_size}px (depth {b.pad_depth_to})", "--mask-run",
                         "pair models trained at the same size")
    msc = sample_options(mpreset, {"steps": mask_steps, "seed": sc.seed, "batch_size": sc.batch_size,
                                   "state_dtype": sc.state_dtype})
    return mck, mpreset, msc


def _mask_condition(mask: np.ndarray, preset) -> Condition:
    """An accepted generated mask (D, H, W) or (H, W) as the image model's condition."""
    from ..data.preprocess import pad_depth

    d = preset.data
    cond = mask.astype(np.float32)
    if cond.ndim == 3:
        cond = pad_depth(cond, d.pad_depth_to, d.pad_mode)
    sp = (FOV_MM / d.image_size, FOV_MM / d.image_size, 1.0)
    return Condition(cond[None], None, sp, d.depth if d.dims == 3 else None)


STREAM_BINS = 0x42494E53  # keyed random size-bin request of output i: (seed, STREAM_BINS, i)
BIN_WEIGHTS = (0.05, 0.10, 0.20, 0.25, 0.20, 0.15, 0.05)  # the reference's random-bin weights


def requested_bins(seed: int, i: int) -> list[int]:
    """The reference's random request: 1-5 tumours, each in a bin drawn with BIN_WEIGHTS."""
    import torch

    from ..runtime import keyed_generator

    g = keyed_generator(seed, STREAM_BINS, i)
    k = int(torch.randint(1, 6, (1,), generator=g))
    picks = torch.multinomial(torch.tensor(BIN_WEIGHTS), k, replacement=True, generator=g)  # (k,)
    return np.bincount(picks.numpy(), minlength=7).tolist()


def _bin_condition(mpreset, bins: list[int]) -> Condition:
    return conditions(mpreset, None, "val", 1, bins)[0]


def _produced_bins(mask: np.ndarray, mpreset) -> list[int]:
    """Size bins of a generated mask on the model grid (240 mm field of view, 1 mm slices), or with the
    spacing the mask model's bins were computed with (``compat.reference_bin_spacing``)."""
    from ..data.sizebins import size_bins

    d = mpreset.data
    sp = (FOV_MM / d.image_size,) * 2
    if mpreset.compat.reference_bin_spacing:
        sx, sy, sz = build.REFERENCE_BIN_SPACING
        sp = (sx, sy)
        spacing = sp if mask.ndim == 2 else (sz, *sp)
    else:
        spacing = sp if mask.ndim == 2 else (1.0, *sp)  # array order (D, H, W)
    return size_bins(mask, spacing, max_count=mpreset.conditioning.max_count).tolist()


def _generate_masks(mmodel, mstrategy, mpreset, msc, n, atlas, max_fraction, retries, dev, bins=None):
    """Masks for outputs 0..n−1 with bounded redraws; returns (accepted {i: mask}, stats {i: dict}).

    Size-bin mask models get a request per output (`bins`, else the reference's random draw) and a
    mask whose recomputed bins differ from it is rejected like any other."""
    import torch

    from ..runtime import keyed_generator

    d = mpreset.data
    shape = build.space_shape(mpreset)  # (1, *spatial) in the mask model's space
    binned = d.mode in BIN_MODES
    want = {i: (list(bins) if bins else requested_bins(msc.seed, i)) for i in range(n)} if binned else {}
    empty = None if binned else conditions(mpreset, None, "val", 1)[0]
    accepted: dict[int, np.ndarray] = {}
    stats = {i: {"attempts": 0, "rejections": {}, "mask_nfe": 0, **({"requested_bins": want[i]} if binned else {})}
             for i in range(n)}
    for r in range(retries + 1):
        pending = [i for i in range(n) if i not in accepted]
        for start in range(0, len(pending), msc.batch_size):
            idx = pending[start:start + msc.batch_size]
            noise = torch.stack([torch.randn(shape, generator=keyed_generator(msc.seed, STREAM_MASK, i, r))
                                 for i in idx]).to(dev)  # (B, 1, ...)
            conds = [_bin_condition(mpreset, want[i]) for i in idx] if binned else [empty] * len(idx)
            res = generate_items(mmodel, mstrategy, mpreset, msc, conds, idx, dev, noise=noise)
            for j, i in enumerate(idx):
                m = finish(res.x[j, 0].cpu().numpy(), True)
                m = m[: d.depth] if m.ndim == 3 else m
                from ..data.atlas import check_mask

                cleaned, why = check_mask(m, atlas, max_fraction)
                st = stats[i]
                if binned and why is None:
                    st["produced_bins"] = _produced_bins(cleaned, mpreset)
                    why = None if st["produced_bins"] == want[i] else "bins"
                st["attempts"] += 1
                st["mask_nfe"] += res.nfe[j]
                if why is None:
                    accepted[i] = cleaned
                else:
                    st["rejections"][why] = st["rejections"].get(why, 0) + 1
        if len(accepted) == n:
            break
    return accepted, stats


def run_paired(ck, preset, sc, out, data, device, dry_run, opts, mask_run=None, mask_steps=None, atlas=None,
               out_split="train", bins=None):
    """`medgen sample --paired`: masks (generated and validated, or a real split) then images on them,
    written as OUT/<out_split>/<id>/{seg,bravo}.nii.gz plus OUT/paired.jsonl."""
    from ..runtime import pick_device

    if preset.data.mode != "bravo":
        raise UsageError(f"--paired needs the image model as --run, this one is '{preset.data.mode}'", "--run",
                         "pass the bravo model as --run and the seg model as --mask-run")
    if mask_steps is not None and mask_run is None:
        raise UsageError("--mask-steps needs --mask-run", "--mask-steps", "add --mask-run SEG_RUN")
    out = _out_dir(Path(out) if out else None, Path(ck.step_dir), sc.solver, sc.steps)
    root = Path(data) if data else (Path(preset.data.root) if preset.data.root else None)
    if bins is not None and mask_run is None:
        raise UsageError("--bins with --paired conditions the mask model", "--bins", "add --mask-run SEG_RUN")
    if mask_run is not None:
        mck, mpreset, msc = _mask_model(mask_run, preset, sc, opts, mask_steps)
        bins = parse_bins(bins, mpreset.conditioning.max_count)
        if bins is not None and mpreset.data.mode not in BIN_MODES:
            raise UsageError(f"--bins needs a size-bin mask model, this one is '{mpreset.data.mode}'", "--bins",
                             "drop --bins, or pass a seg_conditioned run as --mask-run")
        d = preset.data
        shape = (d.image_size,) * 2 if d.dims == 2 else (d.depth, d.image_size, d.image_size)
        from ..data.atlas import read_atlas

        atlas_arr = read_atlas(atlas, shape) if atlas is not None else None
        if atlas_arr is None:
            log.warning("warning: no --atlas given: generated masks are not checked against a brain atlas "
                        "(build one with `medgen data atlas ROOT --size %d`)", d.image_size)
        source = f"generated by {mck.step_dir}"
    else:
        if atlas is not None:
            raise UsageError("--atlas checks generated masks; real masks are used as they are", "--atlas",
                             "drop --atlas, or add --mask-run SEG_RUN")
        conds = conditions(preset, root, sc.split, sc.n)
        source = f"{root}/{sc.split}"
    if dry_run:
        yield {"kind": "config", "checkpoint": str(ck.step_dir), "out": str(out), "masks": source,
               "sample": sc.model_dump()}, f"would write {sc.n} mask/image pairs to {out / out_split}"
        return
    dev = pick_device(device or preset.train.device)
    stats = {i: {"attempts": 0, "rejections": {}, "mask_nfe": 0} for i in range(sc.n)}
    if mask_run is not None:
        mmodel, mstrategy = _build(mpreset, mck, dev, fast=sc.compile)
        masks, stats = _generate_masks(mmodel, mstrategy, mpreset, msc, sc.n, atlas_arr, sc.max_tumour_fraction,
                                       sc.max_retries, dev, bins)
        del mmodel
        conds = {i: _mask_condition(m, preset) for i, m in masks.items()}
    else:
        conds = dict(enumerate(conds))
    model, strategy = _build(preset, ck, dev, fast=sc.compile)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    todo = sorted(conds)
    produced = 0
    for start in range(0, len(todo), sc.batch_size):
        idx = todo[start:start + sc.batch_size]
        res = generate_items(model, strategy, preset, sc, [conds[i] for i in idx], idx, dev)
        for j, i in enumerate(idx):
            folder = out / out_split / f"{i:05d}"
            c = conds[i]
            if c.path is None:
                c.path = str(folder / "seg.nii.gz")
            rec = _write(out, i, res.x[j, 0].cpu().numpy(), c, preset, sc, ck, root, res.nfe[j], res.cfg_batched,
                         folder=folder, as_volume=True,
                         extra={"mask_source": "model" if mask_run else "split",
                                "mask_checkpoint": str(mck.step_dir) if mask_run else None})
            if mask_run is not None:
                rec["split"] = None
            produced += 1
            with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
                fh.write(records.dumps(rec) + "\n")
            _log_pair(out, i, "produced", stats[i], rec["path"], c.path)
            yield rec, rec["path"]
    for i in range(sc.n):
        if i not in conds:
            _log_pair(out, i, "failed", stats[i], None, None)
            log.warning("warning: output %d: no valid mask after %d attempts %s", i, stats[i]["attempts"],
                        stats[i]["rejections"])
    summary = _plain_record("paired-summary", requested=sc.n, produced=produced, failed=sc.n - produced,
                            mask_attempts=sum(s["attempts"] for s in stats.values()),
                            retries=sum(max(s["attempts"] - 1, 0) for s in stats.values()),
                            masks=source, max_retries=sc.max_retries, max_tumour_fraction=sc.max_tumour_fraction,
                            atlas=str(atlas) if atlas else None)
    with open(out / "paired.jsonl", "a", encoding="utf-8") as fh:
        fh.write(records.dumps(summary) + "\n")
    log.info("paired: %d of %d produced under %s", produced, sc.n, out / out_split)


def _log_pair(out: Path, i: int, status: str, st: dict, image, seg) -> None:
    rec = _plain_record("paired", index=i, status=status, mask_attempts=st["attempts"],
                        retries=max(st["attempts"] - 1, 0), rejections=st["rejections"], mask_nfe=st["mask_nfe"],
                        image=image, seg=seg, requested_bins=st.get("requested_bins"),
                        produced_bins=st.get("produced_bins"))
    with open(out / "paired.jsonl", "a", encoding="utf-8") as fh:
        fh.write(records.dumps(rec) + "\n")
