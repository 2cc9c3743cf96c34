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


def scores(name: str, gen, ref, weights=None) -> dict[str, list[float]]:
    """Per-sample metric values for a batch (B, C, ...) on [0, 1]; 3D gives slice-wise and volumetric."""
    from ..metrics import image

    gen, ref = gen.clamp(0, 1), ref.clamp(0, 1)
    if name == "psnr":
        return {"psnr": image.psnr(gen, ref).tolist()}
    if name == "ssim":
        if gen.ndim == 4:
            return {"ssim": image.ssim(gen, ref, 2).tolist()}
        b, d = gen.shape[0], gen.shape[2]
        sl = image.ssim(image._axial_slices(gen), image._axial_slices(ref), 2).reshape(b, d).mean(1)
        return {"ssim": sl.tolist(), "ssim-3d": image.ssim(gen, ref, 3).tolist()}
    if name == "lpips":
        from ..metrics import perceptual

        return {"lpips": perceptual.lpips_alex(gen, ref, weights).tolist()}
    if name == "perceptual-radimagenet":
        from ..metrics import perceptual

        return {name: perceptual.perceptual_radimagenet(gen, ref, weights).tolist()}
    if gen.ndim == 4:
        return {"msssim": image.msssim(gen, ref, 2).tolist()}
    return {"msssim": image.msssim_slices(gen, ref).tolist(), "msssim-3d": image.msssim_3d(gen, ref).tolist()}


PERCEPTUAL = ("lpips", "perceptual-radimagenet")


def _eval_device(device):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _perceptual_fields(rec: dict, k: str, weights=None) -> None:
    """Network, weights fingerprint and preprocessing of the perceptual metrics, into a record."""
    from ..metrics import perceptual

    if k == "lpips":
        rec.update(extractor="lpips-alexnet-v0.1", weights_sha256=perceptual.lpips_sha256(weights),
                   preprocessing=perceptual.LPIPS_PREPROCESSING)
    elif k == "perceptual-radimagenet":
        rec.update(extractor="radimagenet-resnet50", weights_sha256=perceptual.radimagenet_sha256(weights),
                   preprocessing=perceptual.RADIMAGENET_PREPROCESSING,
                   protocol=rec["protocol"] + "; MONAI PerceptualLoss semantics (the reference's 'LPIPS')")


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


def paired(name: str, gen: str, ref: Path, max_items, weights=None, device=None):
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
        if name in PERCEPTUAL:
            t = [x.to(_eval_device(device)) for x in t]
        for k, v in scores(name, *t, weights=weights).items():
            out.setdefault(k, []).extend(v)
    recs = []
    for k, v in out.items():
        rec = metric_record(k, v, len(pairs), str(ref), "paired")
        _perceptual_fields(rec, k, weights)
        recs.append((rec, f"{k}\t{np.mean(v):.4f}"))
    return recs


# ---- one-step reconstructions of a run -----------------------------------------------------------
def one_step_scores(name: str, model, preset, ds, dev, n: int, weights=None) -> dict[str, list[float]]:
    """Per-item scores of x0 = x_t + t*v from one network call at the validation draws."""
    import torch

    from ..engine.trainer import STREAM_VAL_NOISE, STREAM_VAL_T, diffusion_loss
    from ..runtime import autocast, rand_keyed, randn_keyed
    from . import build

    strategy, seed = build.build_strategy(preset), preset.train.seed
    space = build.build_space(preset)  # spaces.py: the model works on encoded items; x0 is decoded
    model.to(dev).eval()
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(n):
            it = ds[i]
            image, cond = it["image"][None].to(dev), it["cond"][None].to(dev)
            z, zc = space.encode_pair(image, cond)
            u = rand_keyed([(seed, STREAM_VAL_T, i)], dev)
            noise = randn_keyed(tuple(z.shape[1:]), [(seed, STREAM_VAL_NOISE, i)], dev)
            with autocast(dev, preset.train.precision):
                _, pred, x_t, t = diffusion_loss(model, strategy, z, zc, u, noise)
            x0 = space.decode(strategy.x0_from(x_t.float(), pred.float(), t))
            if image.ndim == 5:
                depth = ds.depth_of(i)
                x0, image = x0[:, :, :depth], image[:, :, :depth]
            on = dev if name in PERCEPTUAL else "cpu"
            for k, v in scores(name, x0.to(on), image.to(on), weights=weights).items():
                out.setdefault(k, []).extend(v)
    return out


def one_step(name: str, run: Path, split: str | None, data, max_items, device, weights=None):
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
    out = one_step_scores(name, model, preset, ds, pick_device(device or preset.train.device), n, weights)
    ref = f"{root}/{split} (one-step x0)"
    seed = preset.train.seed
    recs = []
    for k, v in out.items():
        rec = metric_record(k, v, n, ref, "one-step-x0", seed)
        _perceptual_fields(rec, k, weights)
        recs.append((rec, f"{k}\t{np.mean(v):.4f}"))
    run_dir = Path(ck.step_dir).parent.parent
    with open(run_dir / "eval.jsonl", "a", encoding="utf-8") as fh:
        for rec, _ in recs:
            fh.write(json.dumps({**rec, "checkpoint": str(ck.step_dir)}) + "\n")
    return recs


def run(name: str, gen=None, ref=None, run=None, split=None, data=None, max_items=None, device=None, weights=None):
    if (gen is None) == (run is None):
        raise UsageError("give either --gen (with --ref) or --run", "medgen eval " + name,
                         "paired: --gen SAMPLES --ref REAL; reconstructions: --run RUN --split val")
    if run is not None:
        return one_step(name, Path(run), split, data, max_items, device, weights)
    return paired(name, gen, ref, max_items, weights, device)


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


# ==================================================================================================
# Distribution metrics: fid | kid | cmmd  (samples against a split or a folder, through a feature net)
# ==================================================================================================
# Volumes become 2-D slices: axial slices (the reference), or axial + coronal + sagittal with
# planes="tri". Only the first DEPTH axial slices of a volume are used (the reference trimmed its
# 160-slice outputs to 150; padding slices are never fed). Generated images are clamped to [0, 1]
# (seg samples: thresholded at 0.5); reference volumes are min-max normalised per volume, as the
# reference did. Reference features are cached under <medgen cache>/features/<key>.npz, the key
# being the sha256 of (each file's content sha256 — memoised by path, size and mtime —, extractor,
# weights sha256, preprocessing, planes, depth): renamed or copied references still hit the cache.

DEPTH = 150
FEATURE_FORMAT = 1
SLICE_BATCH = 256


def _trim(arr: np.ndarray, depth: int | None) -> np.ndarray:
    return arr[..., :depth] if (arr.ndim == 3 and depth) else arr


def volume_planes(arr: np.ndarray, planes: str = "axial") -> list[np.ndarray]:
    """(H, W, D) volume (or (H, W) image) → list of slice stacks (S, h, w), float32."""
    if arr.ndim == 2:
        return [arr[None]]
    out = [np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))]  # axial (D, H, W)
    if planes == "tri":
        out.append(np.ascontiguousarray(np.transpose(arr, (0, 1, 2))))  # slices along H: (H, W, D)
        out.append(np.ascontiguousarray(np.transpose(arr, (1, 0, 2))))  # slices along W: (W, H, D)
    return out


def load_slices(path: str, role: str, planes: str = "axial", depth: int | None = DEPTH, binary: bool = False):
    """One file → list of float32 slice stacks in [0, 1] (module comment above)."""
    from ..data.nifti import read_image
    from ..data.preprocess import minmax

    arr = _trim(read_image(path)[0], depth)
    if binary:
        arr = (arr > 0.5).astype(np.float32)
    elif role == "ref":
        arr = minmax(arr)
    else:
        arr = np.clip(arr, 0.0, 1.0, dtype=np.float32)
    return volume_planes(arr, planes)


# ---- the fast path: reader processes inflate, the device normalises and slices ---------------------
# Worker processes (metrics/reader.py) read each file, inflate it (python-isal's igzip when installed,
# else zlib), parse the NIfTI-1 header and write the voxels, in their stored type, as (S, W, H) — the
# file's Fortran order read backwards, so no transpose on the CPU — into a slot of shared memory.
# This process copies each volume to the device on a side stream (waiting for that copy only, then
# the slot goes back to the workers) and does there what load_slices does on the CPU: scaling,
# min-max / clamp / threshold, the planes, and a NaN/Inf count that is checked once at the end. No
# reader thread shares this process's GIL with the thread that launches the network's kernels.
# Files that are not plain single-file NIfTI-1 go through nibabel (read_image) instead. Volumes are
# processed in the order they finish reading and put back in file order; every volume is its own
# batch (or batches of `batch` slices), so the order changes no number. For large jobs on CUDA the
# extractor replays its forward from a CUDA graph (features.Extractor.graphed), checked once
# against the eager forward.

GRAPH_MIN_FILES = 32  # CUDA graphs pay off from about this many volumes (capture ≈ 3 forward passes)
PREFETCH_MAX = 48  # generated volumes inflated ahead while torch imports (shared memory: that many slots)
_WIDEN = {np.dtype("uint16"): ("int16", "int32", 0xFFFF), np.dtype("uint32"): ("int32", "int64", 0xFFFFFFFF)}


def inflater() -> str:
    from ..metrics.reader import inflater as which

    return which()


def _host_tensor(vol, depth):
    """(CPU tensor (S, W, H) in the stored type, widen) of a reader Volume; nibabel when it has none.

    Unsigned 16/32-bit voxels travel as their signed bit pattern; ``widen`` = (wider dtype name,
    mask) restores the values exactly after the copy to the device.
    """
    import torch

    if vol.array is None:
        from ..data.nifti import read_image

        arr = np.ascontiguousarray(_trim(read_image(vol.path)[0], depth).T)
        return torch.from_numpy(arr if arr.ndim == 3 else arr[None]), None
    arr = vol.array
    widen = _WIDEN.get(arr.dtype)
    if widen is not None:
        return torch.from_numpy(arr.view(widen[0])), widen[1:]
    return torch.from_numpy(arr), None


def _prepare(vol, slope, inter, role: str, binary: bool, widen=None):
    """Device volume (S, W, H), stored type → float32 in [0, 1] as load_slices does; and its NaN/Inf count."""
    import torch

    if widen is not None:
        vol = vol.to(getattr(torch, widen[0])) & widen[1]
    x = vol.float()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        x = x * float(slope) + float(inter or 0)
    bad = (~torch.isfinite(x)).sum()
    if binary:
        x = (x > 0.5).float()
    elif role == "ref":
        lo, hi = x.amin(), x.amax()
        x = (x - lo) / torch.where(hi > lo, hi - lo, torch.full_like(hi, float("inf")))  # constant → zeros
    else:
        x = x.clamp(0.0, 1.0)
    return x, bad


def _planes_of(x, planes: str):
    """(S, W, H) device volume → slice stacks, as volume_planes orders them."""
    out = [x.transpose(1, 2).contiguous()]  # axial (D, H, W)
    if planes == "tri" and x.shape[0] > 1:
        out.append(x.permute(2, 1, 0).contiguous())  # along H: (H, W, D)
        out.append(x.permute(1, 2, 0).contiguous())  # along W: (W, H, D)
    return out


def extract(paths, ext, role: str, planes: str = "axial", depth: int | None = DEPTH, binary: bool = False,
            workers: int | None = None, batch: int = SLICE_BATCH, timings: dict | None = None, pool=None,
            tag: str = "", graph: bool | None = None, stop=None):
    """Features of every slice of every file → (features (N, dim) float32, groups (N,) int32 volume index).

    ``workers``: reader processes (None: one per core but one, ≤ 16; 0: read in this thread).
    ``pool``: a running ``reader.ReaderPool`` to read with (files may already be queued under
    ``(tag, index)``). ``graph``: replay the extractor from CUDA graphs (None: on CUDA from
    ``GRAPH_MIN_FILES`` volumes). ``stop``: asked after each volume; True ends the extraction (None returned).
    """
    import contextlib
    import time

    import torch

    from ..metrics import reader

    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no files to evaluate", "--gen/--ref", "check the inputs")
    workers = reader.default_workers(len(paths)) if workers is None else workers
    dev = ext.device
    cuda = dev.type == "cuda"
    copy_stream = torch.cuda.Stream(dev) if cuda else None
    graph = _graphs_for(ext, len(paths), graph)
    t0 = time.perf_counter()
    if graph:
        warm_graph(ext, paths[0], depth, batch)
    per: list = [None] * len(paths)
    bads: list = [None] * len(paths)
    fallback = 0
    spent = dict.fromkeys(("wait_read", "copy", "compute_launch"), 0.0)  # this thread's time, by stage
    clock = [time.perf_counter()]

    def lap(stage):
        clock.append(time.perf_counter())
        spent[stage] += clock[-1] - clock[-2]

    with (ext.graphed() if graph else contextlib.nullcontext()):
        for i, vol in reader.open_source(paths, depth, workers, pool, tag):
            lap("wait_read")
            fallback += vol.array is None
            host, widen = _host_tensor(vol, depth)
            if cuda:
                with torch.cuda.stream(copy_stream):  # blocking on this stream only: the slot is free after
                    g = host.to(dev)
                torch.cuda.current_stream(dev).wait_stream(copy_stream)
                g.record_stream(torch.cuda.current_stream(dev))
                vol.release()
                lap("copy")
                x, bads[i] = _prepare(g, vol.slope, vol.inter, role, binary, widen)
            else:
                x, bads[i] = _prepare(host, vol.slope, vol.inter, role, binary, widen)  # always a new tensor
                vol.release()
            feats = [ext(s[j:j + batch, None]) for s in _planes_of(x, planes) for j in range(0, s.shape[0], batch)]
            per[i] = feats[0] if len(feats) == 1 else torch.cat(feats)
            lap("compute_launch")
            if stop is not None and stop():
                return None
    bad = torch.stack(bads).cpu()
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise InputError(f"volume has {int(bad[k])} NaN/Inf voxels", paths[k],
                         "fix or re-export the file; medgen does not guess missing values")
    counts = [len(f) for f in per]
    out = (torch.cat(per).cpu().numpy().astype(np.float32),
           np.repeat(np.arange(len(paths), dtype=np.int32), counts))
    lap("compute_launch")  # the end: waiting for the device's last volumes
    if timings is not None:
        timings.update({f"{k}_s": round(v, 4) for k, v in spent.items()})
        timings.update(seconds=time.perf_counter() - t0, files=len(paths), slices=len(out[0]), workers=workers,
                       inflate=inflater(), nibabel_fallback=fallback, graph=bool(graph),
                       reader="pool" if pool is not None else ("inline" if workers <= 0 else
                                                                 "processes" if reader.HAVE_MEMFD else "threads"))
        if graph:
            timings.update(graph_info=dict(getattr(ext, "graph_info", {})))
    return out


def _graphs_for(ext, n_files: int, graph: bool | None) -> bool:
    """Whether ``extract`` replays CUDA graphs for ``n_files`` files (``graph`` None: from GRAPH_MIN_FILES)."""
    return (ext.device.type == "cuda" and hasattr(ext, "graphed")
            and (n_files >= GRAPH_MIN_FILES if graph is None else bool(graph)))


def warm_graph(ext, path, depth, batch: int = SLICE_BATCH) -> None:
    """Start capturing the extractor's graph for the first batch of ``path``'s axial slices (shape from
    the file's header) in the background, while the files are read."""
    from ..metrics import reader

    shape = reader.peek_shape(path, depth) if hasattr(ext, "warm") else None
    if shape is not None:
        s, w, h = shape
        ext.warm((min(s, batch), 1, h, w))


class _ContentHashes:
    """sha256 of each file's bytes: from the memo (path, size, mtime) where known; the others hashed by
    ``pool``'s reader processes, queued at once ahead of their reads (else by threads here)."""

    def __init__(self, paths, pool=None):
        from ..metrics.weights import known_sha256

        self.paths, self.pool = list(paths), pool
        self.out = [known_sha256(p) for p in self.paths]
        self.todo = [i for i, d in enumerate(self.out) if d is None]  # files never hashed before
        self.keys = pool.queue_digests([self.paths[i] for i in self.todo]) if self.todo and pool else None

    def ready(self) -> bool:
        """Whether ``result`` can answer without waiting for the readers."""
        if self.keys is not None:
            got = self.pool.collect(self.keys, wait=False)
            if got is None:
                return False
            self._remember(got)
        return True

    def result(self) -> list:
        from concurrent.futures import ThreadPoolExecutor

        from ..metrics.weights import sha256_file

        if self.keys is not None:
            self._remember(self.pool.collect(self.keys))
        todo = [i for i in self.todo if self.out[i] is None]  # none left unless a worker could not read one:
        if todo:  # hashing it here names the problem
            with ThreadPoolExecutor(max(1, min(16, len(todo)))) as ex:
                for i, d in zip(todo, ex.map(sha256_file, [self.paths[i] for i in todo])):
                    self.out[i] = d
        return self.out

    def _remember(self, got) -> None:
        from ..metrics.weights import remember_sha256

        self.keys = None
        for i, d in zip(self.todo, got):
            if d is not None:
                digest, size, mtime = d.split(":")
                remember_sha256(self.paths[i], digest, int(size), int(mtime))
                self.out[i] = digest


def _file_identity(paths, pool=None) -> list:
    """sha256 of each file's bytes (``_ContentHashes``), waited for."""
    return _ContentHashes(paths, pool).result()


def _feature_cache_entry(folder, identities, ext, planes, depth):
    import hashlib

    key = hashlib.sha256(json.dumps({"files_sha256": identities, "extractor": ext.name,
                                     "weights_sha256": ext.sha256, "preprocessing": ext.preprocessing,
                                     "planes": planes, "depth": depth, "ref_norm": "minmax per volume",
                                     "format": FEATURE_FORMAT}, sort_keys=True).encode()).hexdigest()
    return folder / "features" / f"{key}.npz"


_cache_writes: list = []  # threads writing feature-cache entries (joined at exit, or by the next lookup)


def wait_cache_writes() -> None:
    while _cache_writes:
        _cache_writes.pop().join()


def _write_entry(entry, f, g) -> None:
    import logging
    import os

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".tmp-{os.getpid()}-{entry.name}")
        with open(tmp, "wb") as fh:
            np.savez(fh, features=f, groups=g)
        os.replace(tmp, entry)
    except OSError as exc:
        logging.getLogger("medgen").warning("cannot write the feature cache (%s): %s", entry.parent, exc)


def _load_entry(entry):
    """(features, groups) of a feature-cache entry, or None (missing, or torn: recomputed)."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as z:
            return z["features"], z["groups"]
    except Exception:
        return None


def reference_features(paths, ext, planes: str, depth, cache: bool = True, workers=None, timings=None,
                       pool=None, identities=None, graph=None):
    """Cached reference features (features, groups, hit: bool); the key is the files' content.

    The files' sha256 come from ``identities`` when given, else from the memo, else the reader
    processes hash them (files never seen before, e.g. a dataset copied to scratch), so content already
    cached under other paths is a hit. Files never hashed mean a first build most likely: they are read
    (and the extractor's graph captured) while they are hashed, and the cache is looked up once the
    hashes are in; a hit then stops the reading. A new entry is written from a thread while the caller
    goes on. ``pool``/``graph``: as ``extract``.
    """
    import threading
    import time

    from ..data.cache import resolve_cache_dir
    from ..metrics import reader

    folder = resolve_cache_dir(None if cache else False)
    paths = list(paths)
    n_workers = reader.default_workers(len(paths)) if workers is None else workers
    wait_cache_writes()
    t0 = time.perf_counter()
    own = None
    if pool is None and n_workers > 0 and reader.HAVE_MEMFD and paths:
        own = pool = reader.ReaderPool.for_files(paths, n_workers)
    found = {}

    def key(ids):
        found["entry"] = _feature_cache_entry(folder, ids, ext, planes, depth)
        found["hit"] = _load_entry(found["entry"])
        if timings is not None:
            timings["content_hash_s"] = time.perf_counter() - t0
        return found["hit"] is not None

    try:
        hashes = stop = None
        if folder and identities is None:
            hashes = _ContentHashes(paths, pool)
            if hashes.keys is None:
                identities = hashes.result()
            else:
                pool.submit_files(paths, depth, "ref")
                if _graphs_for(ext, len(paths), graph):
                    warm_graph(ext, paths[0], depth)

                def stop():  # after each volume, until the hashes are in
                    return "entry" not in found and hashes.ready() and key(hashes.result())
        hit = folder and identities is not None and key(identities)
        out = None if hit else extract(paths, ext, "ref", planes, depth, workers=n_workers, timings=timings,
                                       pool=pool, tag="ref", graph=graph, stop=stop)
        # out None: a hit (found before or while reading); else the hashes may have come in after the reading
        if out is None or (folder and "entry" not in found and key(hashes.result())):
            if pool is not None:
                pool.discard([("ref", i) for i in range(len(paths))])  # reads queued ahead
            return (*found["hit"], True)
    finally:
        if own is not None:
            own.close()
    if folder and found["hit"] is None:
        t = threading.Thread(target=_write_entry, args=(found["entry"], *out), name="medgen-feature-cache")
        t.start()
        _cache_writes.append(t)
    return (*out, False)


def _gen_inputs(gen: str, modality: str):
    """(files, sample records or []) of --gen: a sample folder (samples.jsonl), '-' (records), a folder."""
    if gen == "-":
        recs = [r for r in records.parse_lines(sys.stdin) if r["kind"] == "sample"]
        if not recs:
            raise InputError("no sample records on stdin", "--gen -", "pipe `medgen sample --json` into it")
        return [Path(r["path"]) for r in recs], recs
    root = Path(gen)
    if not root.is_dir():
        raise InputError(f"not a folder: {gen}", "--gen", "give the folder medgen sample wrote, or '-'")
    listing = root / "samples.jsonl"
    if listing.is_file():
        recs = [r for r in records.read_file(listing) if r["kind"] == "sample"]
        return [Path(r["path"]) for r in recs], recs
    files = sorted(root.rglob(f"{modality}.nii*")) or sorted(root.rglob("*.nii*"))
    if not files:
        raise InputError("no NIfTI files in the folder", gen, f"expected <item>/{modality}.nii.gz files")
    return files, []


def _ref_inputs(ref: str, recs: list, data, modality: str) -> tuple[list[Path], str]:
    from ..data import layout

    if ref is None:
        raise UsageError("no reference given", "--ref", "pass --ref train|val|test|all or a folder")
    if ref in layout.SPLIT_NAMES:
        root = Path(data) if data else None
        if root is None:
            roots = {r.get("data_root") for r in recs if r.get("data_root")}
            if len(roots) > 1:
                raise UsageError(f"sample records name several data roots: {sorted(roots)}", "--ref",
                                 "pass --data DIR to choose one")
            root = Path(roots.pop()) if roots else None
        if root is None:
            raise UsageError(f"--ref {ref} needs a dataset root", "--ref",
                             "pass --data DIR (or give samples whose records carry data_root)")
        files = []
        for p in layout.patients(root, ref):
            from ..data.nifti import find_modality

            f = find_modality(p, modality)
            if f is None:
                raise InputError(f"no {modality} volume", p, "every patient needs the modality evaluated")
            files.append(f)
        return files, f"{root}/{ref}"
    folder = Path(ref)
    if not folder.is_dir():
        raise InputError(f"not a split name or a folder: {ref}", "--ref",
                         "use train|val|test|all (with --data) or a folder of NIfTI volumes")
    files = sorted(folder.rglob(f"{modality}.nii*")) or sorted(folder.rglob("*.nii*"))
    if not files:
        raise InputError("no NIfTI files under the reference folder", folder, f"expected */{modality}.nii.gz")
    return files, str(folder)


def feature_metric(names, gen: str, ref: str, data=None, extractor: str | None = None, weights=None,
                   protocol: str = "both", planes: str = "axial", depth: int | None = DEPTH,
                   modality: str = "bravo", seed: int = 42, ci: bool = False, ci_replicates: int = 100,
                   device=None, precision=None, cache: bool = True, max_items=None, workers=None):
    """FID / KID / CMMD records of --gen against --ref (see the comment above)."""
    from ..metrics import bootstrap, distribution, features

    names = [names] if isinstance(names, str) else list(names)
    if protocol not in ("reference", "standard", "both"):
        raise UsageError(f"unknown protocol '{protocol}'", "--protocol", "choose reference, standard or both")
    if planes not in ("axial", "tri"):
        raise UsageError(f"unknown planes '{planes}'", "--planes", "choose axial or tri")
    extractor = extractor or features.DEFAULT_FOR[names[0]]
    features.check_name(extractor)
    gen_files, recs = _gen_inputs(gen, modality)
    gen_files = gen_files[:max_items]
    ref_files, ref_name = _ref_inputs(ref, recs, data, modality)
    binary = any(r.get("modality") == "seg" for r in recs) or modality == "seg"
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ..metrics import reader
    from ..metrics.weights import known_sha256

    clock = [time.perf_counter()]

    def lap():
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 4)

    # Before torch is imported (seconds on a cold machine): reader processes start inflating the
    # generated volumes into shared memory, and a thread looks up the reference files' memoised content
    # hashes (files never hashed are hashed by the readers, after the generated volumes).
    n_workers = reader.default_workers(len(gen_files) + len(ref_files)) if workers is None else workers
    pool = None
    if n_workers > 0 and reader.HAVE_MEMFD:
        pool = reader.ReaderPool.for_files(gen_files + ref_files, n_workers,
                                           slots=max(n_workers + 2, min(len(gen_files), PREFETCH_MAX)))
        for i, p in enumerate(gen_files):
            pool.submit(("gen", i), p, depth)
    hasher = ThreadPoolExecutor(1, thread_name_prefix="medgen-hash") if cache else None
    identities = hasher.submit(lambda: [known_sha256(p) for p in ref_files]) if hasher else None
    try:
        seconds = {"start_readers": lap()}
        ext = features.load(extractor, weights, device, precision)
        seconds["load_network"] = lap()
        la_device = ext.device if ext.device.type == "cuda" else None  # FID's eigendecompositions
        la_warm = features.warm_linalg(la_device) if "fid" in names else None
        known = identities.result() if identities else None
        if pool is not None and known and None in known:  # a first build, most likely: read behind the gen
            pool.submit_files(ref_files, depth, "ref")
        gf, gg = extract(gen_files, ext, "gen", planes, depth, binary, n_workers, pool=pool, tag="gen")
        seconds["generated"] = lap()
        rf, rg, hit = reference_features(ref_files, ext, planes, depth, cache, n_workers, pool=pool,
                                         identities=known if known and None not in known else None)
        seconds["reference"] = lap()
        if la_warm is not None:
            la_warm.join()
    finally:
        if pool is not None:
            pool.close()
        if hasher is not None:
            hasher.shutdown(wait=False)
    protocols = ("reference", "standard") if protocol == "both" else (protocol,)
    prep = f"{ext.preprocessing}; planes {planes}; first {depth} axial slices; gen clamp [0,1]" + \
           ("/threshold 0.5" if binary else "") + "; ref min-max per volume"
    out = []
    for name in names:
        for prot in (("reference",) if name == "fid" else protocols):
            v = distribution.compute(name, gf, rf, prot, seed, la_device)
            interval = None
            if ci:
                interval = bootstrap.interval(lambda a, b: distribution.compute(name, a, b, prot, seed, la_device).value,
                                              gf, rf, gg, rg, replicates=ci_replicates, seed=seed)
            rec_name = name if prot == "reference" or name == "fid" else f"{name}_standard"
            prot_label = {"fid": "frechet, unbiased covariance",
                          "kid": f"{prot}: {v.detail.get('subsets')} subsets of {v.detail.get('subset_size')}, "
                                 "unbiased MMD2, cubic kernel",
                          "cmmd": ("reference: sqrt(unbiased MMD2), RBF median bandwidth" if prot == "reference"
                                   else "standard: 1000 x biased MMD2, RBF sigma 10")}[name]
            rec = records.make("metric", name=rec_name, value=v.value, ci=interval, n_gen=len(gen_files),
                               n_ref=len(ref_files), ref=ref_name, protocol=prot_label, extractor=ext.name,
                               weights_sha256=ext.sha256, preprocessing=prep, seed=seed)
            seconds[rec_name] = lap()
            rec.update({"n_gen_slices": int(len(gf)), "n_ref_slices": int(len(rf)), "ref_cache_hit": hit,
                        "seconds": dict(seconds),
                        "detail": v.detail, "weights_path": ext.weights_path,
                        "ci_method": f"percentile bootstrap over volumes, {ci_replicates} replicates, 95%" if ci else None})
            human = f"{rec_name}\t{v.value:.6g}" + (f"\t[{interval[0]:.6g}, {interval[1]:.6g}]" if interval else "")
            out.append((rec, human))
    return out


# ==================================================================================================
# Segmentation: eval seg --pred P --ref R
# ==================================================================================================
def _pair_folders(pred: str, ref, what: str):
    from ..data.nifti import NIFTI_SUFFIXES

    if ref is None:
        raise UsageError(f"{what} compares pairs: no reference given", "--ref", "pass --ref FOLDER")
    root, ref = Path(pred), Path(ref)
    if not root.is_dir():
        raise InputError(f"not a folder: {pred}", "--pred/--gen", "give a folder of masks")
    if ref.is_file() and root.is_file():
        return [(root, ref)]
    listing = root / "samples.jsonl"
    files = [Path(r["path"]) for r in records.read_file(listing) if r["kind"] == "sample"] if listing.is_file() \
        else sorted(p for p in root.rglob("*") if p.name.endswith(NIFTI_SUFFIXES))
    pairs = [(p, ref / p.relative_to(root)) for p in files]
    pairs = [(p, r) for p, r in pairs if r.is_file()]
    if not pairs:
        raise InputError(f"no file under {pred} has a partner under {ref}", "--ref",
                         "pair files by the same relative path, e.g. 00000/seg.nii.gz")
    return pairs


def _spacing_dhw(spacing_xyz, override) -> tuple:
    sx, sy, sz = override if override else spacing_xyz
    return (sz, sx, sy)


def seg_metric(pred: str, ref, threshold: float = 0.5, hd_voxels: bool = False, spacing=None, max_items=None):
    import logging

    from ..data.nifti import read_image, to_dhw
    from ..metrics import seg

    log = logging.getLogger("medgen")
    pairs = _pair_folders(pred, ref, "seg")[:max_items]
    cases, soft = [], 0
    for p, r in pairs:
        a, sp, _ = read_image(p)
        b = read_image(r)[0]
        if a.shape != b.shape:
            raise InputError(f"shapes differ: {a.shape} vs {b.shape}", f"{p} / {r}", "compare like with like")
        pa, was_soft = seg.binarise(a, threshold)
        gb, _ = seg.binarise(b, 0.5)
        soft += was_soft
        sp = _spacing_dhw(sp, spacing) if a.ndim == 3 else tuple((spacing or sp)[:2])
        if a.ndim == 3:
            pa, gb = to_dhw(pa), to_dhw(gb)
        cases.append(seg.scores(pa, gb, sp, hd_in_voxels=hd_voxels))
    if soft:
        log.warning("notice: %d predicted mask(s) were soft (not {0,1}); thresholded at > %g before every metric",
                    soft, threshold)
    summary = seg.summarise(cases)
    unit = "voxels" if hd_voxels else "mm"
    desc = {"dice": "voxel Dice per case, mean (both empty = 1)", "iou": "voxel IoU per case, mean",
            "precision": "voxel precision per case, mean", "recall": "voxel recall per case, mean",
            "hd95": f"symmetric 95th-percentile surface distance in {unit} (MONAI definition), empty cases skipped",
            "dice_pooled": "voxel Dice pooled over all cases",
            "lesion_dice": "reference per-lesion Dice inside each GT lesion footprint (smooth 1), mean over lesions"}
    out = []
    for k, (v, n) in summary.items():
        protocol = desc.get(k, f"reference per-lesion Dice, RANO-BM class {k.rsplit('_', 1)[-1]}")
        rec = records.make("metric", name=k, value=v, ci=None, n_gen=len(pairs), n_ref=len(pairs), ref=str(ref),
                           protocol=protocol, extractor=None, weights_sha256=None,
                           preprocessing=f"prediction thresholded > {threshold}; face-connected lesions", seed=None)
        rec["n"] = n
        rec["soft_inputs_thresholded"] = soft
        out.append((rec, f"{k}\t{v:.4f}\t(n={n})"))
    return out


# ==================================================================================================
# Size-bin adherence: eval bins --gen G [--ref R]
# ==================================================================================================
def bins_metric(gen: str, ref=None, spacing=None, max_items=None, compat_sampled: bool = False):
    from ..data.nifti import read_image, read_mask, to_dhw
    from ..data.sizebins import size_bins
    from ..metrics import bins, seg

    root = Path(gen)
    listing = root / "samples.jsonl"
    pairs = []
    if ref is None and listing.is_file():
        for r in records.read_file(listing):
            if r["kind"] == "sample" and r.get("condition"):
                pairs.append((Path(r["path"]), Path(r["condition"])))
        if not pairs:
            raise InputError("sample records carry no conditioning mask", listing,
                             "pass --ref FOLDER with the requested masks paired by relative path")
    else:
        pairs = _pair_folders(gen, ref, "bins")
    pairs = pairs[:max_items]

    def vec(path, is_gen):
        arr, sp, _ = read_image(path)
        m = seg.binarise(arr, 0.5)[0] if is_gen else read_mask(path).astype(bool)
        if m.ndim == 3:
            return size_bins(to_dhw(m), _spacing_dhw(sp, spacing), compat_sampled=compat_sampled, seed=42)
        return size_bins(m, tuple((spacing or sp)[:2]), compat_sampled=compat_sampled, seed=42)

    vals = bins.summarise([(vec(r, False), vec(g, True)) for g, r in pairs])
    desc = {"bins_exact": "whole 7-bin vector equal", "bins_presence": "tumour presence agrees",
            "bins_count": "total tumour count equal", "bins_per_bin_acc": "mean over 7 bins of count equality",
            "bins_mae": "mean absolute count error over 7 bins"}
    out = []
    for k, v in vals.items():
        rec = records.make("metric", name=k, value=float(np.mean(v)), ci=None, n_gen=len(pairs), n_ref=len(pairs),
                           ref=str(ref) if ref else "conditioning masks", protocol=desc[k], extractor=None,
                           weights_sha256=None, seed=None,
                           preprocessing="generated > 0.5; face-connected components; exact Feret"
                                         + (" (compat sampled)" if compat_sampled else ""))
        out.append((rec, f"{k}\t{np.mean(v):.4f}"))
    return out
