"""`medgen eval psnr|msssim`: paired image metrics, or a run's one-step x0 reconstructions.

Paired: every NIfTI under --gen is matched to the file at the same relative path under --ref.
One-step (SYSTEM.md §9, the reference's validation metric): for each item of a split, x_t is
drawn at a keyed random t with keyed noise, the network predicts, and x0 = x_t + t*v is compared
with the clean item. 3D volumes are compared on their original slices (padding trimmed); MS-SSIM
of a volume is reported slice-wise (`msssim`) and volumetric (`msssim-3d`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import records
from ..errors import CheckFailed, InputError, UsageError

PREPROCESSING = "clamp to [0,1]; 3D padding trimmed"


def metric_record(name, values, n_ref, ref, protocol, seed=None) -> dict:
    return records.make("metric", name=name, value=float(np.mean(values)), ci=None, n_gen=len(values),
                        n_ref=n_ref, ref=ref, protocol=protocol, extractor=None, weights_sha256=None,
                        preprocessing=PREPROCESSING, seed=seed)


def scores(name: str, gen, ref) -> dict[str, list[float]]:
    """Per-sample metric values for a batch (B, C, ...) on [0, 1]; 3D gives slice-wise and volumetric."""
    from ..metrics import image

    gen, ref = gen.clamp(0, 1), ref.clamp(0, 1)
    if name == "psnr":
        return {"psnr": image.psnr(gen, ref).tolist()}
    if gen.ndim == 4:
        return {"msssim": image.msssim(gen, ref, 2).tolist()}
    return {"msssim": image.msssim_slices(gen, ref).tolist(), "msssim-3d": image.msssim_3d(gen, ref).tolist()}


# ---- paired folders ------------------------------------------------------------------------------
def _files(gen: str) -> tuple[list[Path], Path]:
    if gen == "-":
        paths = [Path(r["path"]).resolve() for r in records.parse_lines(sys.stdin) if r["kind"] == "sample"]
        if not paths:
            raise InputError("no sample records on stdin", "--gen -", "pipe `medgen sample --json` into it")
        import os

        return paths, Path(os.path.commonpath([p.parent.parent for p in paths]))
    root = Path(gen).resolve()
    if not root.is_dir():
        raise InputError(f"not a folder: {gen}", "--gen", "give the folder medgen sample wrote")
    listing = root / "samples.jsonl"  # a sample folder lists its generated files (not the masks)
    if listing.is_file():
        return [Path(r["path"]).resolve() for r in records.read_file(listing) if r["kind"] == "sample"], root
    return sorted(root.rglob("*.nii*")), root


def paired(name: str, gen: str, ref: Path, max_items):
    import torch

    from ..data.nifti import read_image

    if ref is None:
        raise UsageError(f"{name} compares pairs: no reference given", "--ref", "pass --ref FOLDER")
    paths, root = _files(gen)
    pairs = [(p, ref / p.relative_to(root)) for p in paths]
    pairs = [(g, r) for g, r in pairs if r.is_file()][:max_items]
    if not pairs:
        raise InputError(f"no file under {gen} has a partner under {ref}", "--ref",
                         "pair files by the same relative path, e.g. 00000/bravo.nii.gz")
    out: dict[str, list[float]] = {}
    for g, r in pairs:
        a, b = read_image(g)[0], read_image(r)[0]
        if a.shape != b.shape:
            raise InputError(f"shapes differ: {a.shape} vs {b.shape}", f"{g} / {r}", "compare like with like")
        t = [torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None] for x in (a, b)]
        if a.ndim == 3:  # (H, W, D) -> (1, 1, D, H, W)
            t = [x.permute(0, 1, 4, 2, 3) for x in t]
        for k, v in scores(name, *t).items():
            out.setdefault(k, []).extend(v)
    return [(metric_record(k, v, len(pairs), str(ref), "paired"), f"{k}\t{np.mean(v):.4f}") for k, v in out.items()]


# ---- one-step reconstructions of a run -----------------------------------------------------------
def one_step_scores(name: str, model, preset, ds, dev, n: int) -> dict[str, list[float]]:
    """Per-item scores of x0 = x_t + t*v from one network call at the validation draws."""
    import torch

    from ..engine.trainer import STREAM_VAL_NOISE, STREAM_VAL_T, diffusion_loss
    from ..runtime import autocast, rand_keyed, randn_keyed
    from . import build

    strategy, seed = build.build_strategy(preset), preset.train.seed
    model.to(dev).eval()
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(n):
            it = ds[i]
            image, cond = it["image"][None].to(dev), it["cond"][None].to(dev)
            u = rand_keyed([(seed, STREAM_VAL_T, i)], dev)
            noise = randn_keyed(tuple(image.shape[1:]), [(seed, STREAM_VAL_NOISE, i)], dev)
            with autocast(dev, preset.train.precision):
                _, pred, x_t, t = diffusion_loss(model, strategy, image, cond, u, noise)
            x0 = strategy.x0_from(x_t.float(), pred.float(), t)
            if image.ndim == 5:
                depth = ds.depth_of(i)
                x0, image = x0[:, :, :depth], image[:, :, :depth]
            for k, v in scores(name, x0.cpu(), image.cpu()).items():
                out.setdefault(k, []).extend(v)
    return out


def one_step(name: str, run: Path, split: str | None, data, max_items, device):
    from .. import checkpoint as ckpt
    from ..config import validate
    from ..runtime import pick_device
    from . import build

    ck = ckpt.load_checkpoint(str(run), "best", "ema")
    preset = validate(ck.config, where=str(ck.step_dir))
    split = split or preset.eval.split
    root = Path(data) if data else build.data_root(preset)
    ds = build.build_dataset(preset, split, root)
    model = build.build_model(preset)
    model.load_state_dict(ck.model_state)
    n = len(ds) if max_items is None else min(max_items, len(ds))
    out = one_step_scores(name, model, preset, ds, pick_device(device or preset.train.device), n)
    ref = f"{root}/{split} (one-step x0)"
    seed = preset.train.seed
    recs = [(metric_record(k, v, n, ref, "one-step-x0", seed), f"{k}\t{np.mean(v):.4f}") for k, v in out.items()]
    run_dir = Path(ck.step_dir).parent.parent
    with open(run_dir / "eval.jsonl", "a", encoding="utf-8") as fh:
        for rec, _ in recs:
            fh.write(json.dumps({**rec, "checkpoint": str(ck.step_dir)}) + "\n")
    return recs


def run(name: str, gen=None, ref=None, run=None, split=None, data=None, max_items=None, device=None):
    if (gen is None) == (run is None):
        raise UsageError("give either --gen (with --ref) or --run", "medgen eval " + name,
                         "paired: --gen SAMPLES --ref REAL; reconstructions: --run RUN --split val")
    if run is not None:
        return one_step(name, Path(run), split, data, max_items, device)
    return paired(name, gen, ref, max_items)


def check_thresholds(recs: list[dict], max_: list[str], min_: list[str]) -> None:
    """`--max fid=40` / `--min psnr=30`: every violation is listed, then exit 6."""
    values = {r["name"]: r["value"] for r in recs}
    bad = []
    for items, worse, word in ((max_, lambda v, lim: v > lim, "above"), (min_, lambda v, lim: v < lim, "below")):
        for item in items:
            name, _, lim = item.partition("=")
            try:
                limit = float(lim)
            except ValueError:
                raise UsageError(f"threshold must be name=value, got '{item}'", "--max/--min", "e.g. --min psnr=30")
            if name not in values:
                raise UsageError(f"no metric '{name}' to check", "--max/--min", f"metrics here: {sorted(values)}")
            if worse(values[name], limit):
                bad.append(f"{name}={values[name]:.4g} is {word} {limit:g}")
    if bad:
        raise CheckFailed("; ".join(bad), "thresholds", "the metric check failed")
