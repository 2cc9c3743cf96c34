"""`medgen eval solvers` and `medgen eval optimal-steps`: sampling configurations compared on one model.

Every configuration generates the same n outputs (noise of output i from seed + i, the first n
conditions of a split) and scores them against a reference with the eval job's metric functions
(``jobs.evaluate.scores``):

- ``--ref ode`` (default): the same noise integrated by dopri5 at atol = rtol = 1e-5, i.e. how far a
  configuration is from the exact ODE solution (discretisation error; any mode);
- ``--ref real``: the real image of each conditioning item (bravo models only).

Resumable: each finished configuration is appended (and fsynced) to ``OUT/results.jsonl`` keyed by its
id; a rerun skips ids already there, so a crash loses at most the configuration in progress. The
reference is cached in ``OUT/reference.safetensors``. The optimal-steps search shares the same cache.
Outputs: ``results.jsonl``, ``table.md``, one ``nfe-<metric>.png`` per metric (Pillow), and metric
records on stdout (protocol ``solver-sweep``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import records
from ..errors import InputError, UsageError

log = logging.getLogger("medgen")

FIXED_STEPS = (5, 10, 25, 50, 100)
TOLS = (1e-2, 1e-3)
QUICK_STEPS, QUICK_TOLS = (10, 50), (1e-3, 1e-5)
RESTART_STEPS = 25
RESTART_GRID = ((1, 3, 0.1, 0.3), (1, 5, 0.1, 0.3), (2, 3, 0.1, 0.3), (2, 5, 0.1, 0.3), (2, 10, 0.1, 0.3),
                (1, 5, 0.05, 0.2), (1, 5, 0.1, 0.5))
REF_TOL = 1e-5
HIGHER_IS_BETTER = {"psnr": True, "msssim": True, "msssim-3d": True, "fid": False, "kid": False, "cmmd": False}


@dataclass(frozen=True)
class Config:
    solver: str
    steps: int = 25
    tol: float | None = None
    restart: tuple | None = None

    @property
    def id(self) -> str:
        if self.restart:
            k, n, lo, hi = self.restart
            return f"restart-{self.steps}-K{k}-n{n}-{lo:g}-{hi:g}"
        if self.tol is not None:
            return f"{self.solver}-tol{self.tol:.0e}"
        return f"{self.solver}-{self.steps}"

    @property
    def family(self) -> str:
        return "restart" if self.restart else self.solver

    def options(self) -> dict:
        opts = {"solver": self.solver, "steps": self.steps, "restart": self.restart}
        if self.tol is not None:
            opts.update(atol=self.tol, rtol=self.tol)
        return opts


def grid(quick: bool = False, restart: bool = True, solvers: list[str] | None = None,
         steps: list[int] | None = None) -> list[Config]:
    """The reference grid (SYSTEM.md §9): fixed × steps, adaptive × tolerances, then the Restart grid.
    ``steps`` replaces the fixed-step counts."""
    from ..solvers import ADAPTIVE, FIXED

    dsteps, tols = (QUICK_STEPS, QUICK_TOLS) if quick else (FIXED_STEPS, TOLS)
    steps = steps or dsteps
    chosen = solvers or list(FIXED) + list(ADAPTIVE)
    out = [Config(s, n) for s in FIXED if s in chosen for n in steps]
    out += [Config(s, tol=t) for s in ADAPTIVE if s in chosen for t in tols]
    if restart:
        out += [Config("euler", RESTART_STEPS, restart=r) for r in RESTART_GRID]
    return out


PAIRED_METRICS = ("psnr", "msssim")  # against --ref (the ODE solution or the conditions' real images)
FEATURE_METRICS = ("fid", "kid", "cmmd")  # against --feature-ref, the reference protocols of `medgen eval`


class Sweep:
    """One model, one set of conditions and noises, a cache of finished configurations."""

    def __init__(self, run_ref: str, out: Path, n: int, split: str | None, data, metrics: list[str], ref: str,
                 device, batch_size: int | None, seed: int | None, weights=None, which=None, feature_ref="all"):
        from ..runtime import pick_device
        from . import sample as sj

        self.ck, self.preset = sj._load(sj.checkpoint_ref(run_ref), weights, which)
        if self.preset.diffusion.kind != "rflow":
            raise UsageError("solver sweeps integrate a rectified-flow ODE; this model is DDPM", "--run",
                             "sweep DDIM steps with `medgen sample --steps N` instead")
        if ref not in ("ode", "real"):
            raise UsageError(f"unknown reference '{ref}'", "--ref", "use ode or real")
        if ref == "real" and self.preset.data.mode != "bravo":
            raise UsageError("--ref real pairs generated images with real ones: bravo models only", "--ref",
                             "use --ref ode")
        for m in metrics:
            if m not in PAIRED_METRICS + FEATURE_METRICS:
                raise UsageError(f"unknown metric '{m}'", "--metric", "use psnr, msssim, fid, kid or cmmd")
        self.metrics, self.ref_kind, self.n, self.feature_ref = metrics, ref, n, feature_ref
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        base = {"n": n, "split": split, "batch_size": batch_size, "seed": seed}
        self.sc = sj.sample_options(self.preset, base)
        root = Path(data) if data else (Path(self.preset.data.root) if self.preset.data.root else None)
        self.root = root
        self.conds = sj.conditions(self.preset, root, self.sc.split, n)
        self.dev = pick_device(device or self.preset.train.device)
        self.model, self.strategy = sj._build(self.preset, self.ck, self.dev)
        self.results = self._load_results()
        paired = [m for m in metrics if m in PAIRED_METRICS]
        self.reference = self._reference() if paired else None
        self.extractors = self._feature_references([m for m in metrics if m in FEATURE_METRICS])

    # ---- cache ------------------------------------------------------------------------------------
    def _key(self) -> dict:
        return {"checkpoint": str(Path(self.ck.step_dir).resolve()), "weights": self.ck.weights, "n": self.n,
                "seed": self.sc.seed, "split": self.sc.split, "ref": self.ref_kind, "grid": self.sc.grid,
                "feature_ref": self.feature_ref}

    def _load_results(self) -> dict[str, dict]:
        path, out = self.out / "results.jsonl", {}
        key = self._key()
        if path.is_file():
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: recompute that configuration
                    continue
                if r.get("key") != key:
                    raise InputError("the sweep folder holds results of another model or setting", str(path),
                                     "use a new --out folder, or the same --run/--n/--seed/--split/--ref")
                out[r["id"]] = r
        return out

    def _append(self, rec: dict) -> None:
        path = self.out / "results.jsonl"
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("\n" if torn else "") + json.dumps(rec) + "\n")  # a line cut by a crash stays apart
            fh.flush()
            os.fsync(fh.fileno())
        self.results[rec["id"]] = rec

    # ---- generation -------------------------------------------------------------------------------
    def _generate(self, opts: dict):
        """All n outputs under ``opts``: (x (n, C, ...) float32 CPU, NFE per sample)."""
        import torch

        from . import sample as sj

        sc = sj.sample_options(self.preset, {**self.sc.model_dump(), **opts})
        xs, nfes = [], []
        for start in range(0, self.n, sc.batch_size):
            idx = list(range(start, min(start + sc.batch_size, self.n)))
            res = sj.generate_items(self.model, self.strategy, self.preset, sc, [self.conds[i] for i in idx], idx,
                                    self.dev)
            xs.append(res.x.cpu())
            nfes += res.nfe
        return self._finish(torch.cat(xs)), nfes

    def _finish(self, x):
        import torch

        from .sample import finish

        x = torch.from_numpy(finish(x.numpy(), self.preset.data.mode == "seg"))
        if x.ndim == 5:
            x = x[:, :, : self.preset.data.depth]
        return x

    def _feature_references(self, names: list[str]) -> dict:
        """{metric: (extractor, reference features)}: the --feature-ref split's bravo volumes through the
        metric's default network (offline weights), features cached as `medgen eval fid` caches them."""
        if not names:
            return {}
        from ..metrics import features
        from .evaluate import DEPTH, _ref_inputs, reference_features

        files, _ = _ref_inputs(self.feature_ref, [], self.root, "bravo")
        loaded, out = {}, {}
        for name in names:
            ext_name = features.DEFAULT_FOR[name]
            if ext_name not in loaded:
                ext = features.load(ext_name, None, self.dev)
                loaded[ext_name] = (ext, reference_features(files, ext, "axial", DEPTH)[0])
            out[name] = loaded[ext_name]
        return out

    def _feature_scores(self, x) -> dict[str, float]:
        """FID/KID/CMMD (reference protocols) of the generated batch's axial slices."""
        import torch

        from ..metrics import distribution

        slices = x[:, 0] if x.ndim == 5 else x[:, 0:1]  # 3D: (n, D, H, W) -> slices; 2D: (n, 1, H, W)
        slices = slices.reshape(-1, 1, *slices.shape[-2:])  # (N, 1, H, W)
        values = {}
        for name, (ext, rf) in self.extractors.items():
            gf = torch.cat([ext(slices[j:j + 256]) for j in range(0, len(slices), 256)]).cpu().numpy()
            values[name] = float(distribution.compute(name, gf, rf, "reference", self.sc.seed).value)
        return values

    def _reference(self):
        import torch
        from safetensors.torch import load_file, save_file

        path = self.out / "reference.safetensors"
        if self.ref_kind == "real":
            from . import build

            ds = build.build_dataset(self.preset, self.sc.split, self.root)
            ref = torch.stack([ds[i]["image"] for i in range(self.n)]).float()
            return ref[:, :, : self.preset.data.depth] if ref.ndim == 5 else ref
        if path.is_file():
            return load_file(str(path))["reference"]
        log.info("reference: dopri5 at tolerance %g on %d outputs", REF_TOL, self.n)
        ref, _ = self._generate({"solver": "dopri5", "atol": REF_TOL, "rtol": REF_TOL, "restart": None})
        tmp = path.with_suffix(".tmp")
        save_file({"reference": ref.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return torch.as_tensor(ref)

    def evaluate(self, cfg: Config) -> dict:
        """Scores of one configuration, from the cache when it was finished before."""
        if cfg.id in self.results:
            log.info("%s: cached", cfg.id)
            return self.results[cfg.id]
        from .evaluate import scores

        x, nfes = self._generate(cfg.options())
        values: dict[str, float] = {}
        for m in self.metrics:
            if m in PAIRED_METRICS:
                for k, v in scores(m, x, self.reference).items():
                    values[k] = float(np.mean(v))
        values.update(self._feature_scores(x))
        rec = {"id": cfg.id, "family": cfg.family, "solver": cfg.solver, "steps": cfg.steps, "tol": cfg.tol,
               "restart": list(cfg.restart) if cfg.restart else None, "nfe": float(np.mean(nfes)),
               "nfe_per_sample": nfes, "metrics": values, "key": self._key()}
        self._append(rec)
        log.info("%s: nfe %.1f %s", cfg.id, rec["nfe"], " ".join(f"{k}={v:.4f}" for k, v in values.items()))
        return rec

    def metric_record(self, rec: dict, name: str) -> dict:
        ref = f"dopri5 tol {REF_TOL:g} on the same noise" if self.ref_kind == "ode" else \
            f"{self.root}/{self.sc.split} (real images of the conditions)"
        if name in self.extractors:
            ext = self.extractors[name][0]
            return {**records.make("metric", name=name, value=rec["metrics"][name], ci=None, n_gen=self.n,
                                   n_ref=None, ref=f"{self.root}/{self.feature_ref} (axial slices)",
                                   protocol="solver-sweep; reference protocol", extractor=ext.name,
                                   weights_sha256=ext.sha256, preprocessing=ext.preprocessing, seed=self.sc.seed),
                    "config": rec["id"], "solver": rec["solver"], "steps": rec["steps"], "tol": rec["tol"],
                    "restart": rec["restart"], "nfe": rec["nfe"], "checkpoint": str(self.ck.step_dir)}
        return {**records.make("metric", name=name, value=rec["metrics"][name], ci=None, n_gen=self.n, n_ref=self.n,
                               ref=ref, protocol="solver-sweep", extractor=None, weights_sha256=None,
                               preprocessing="clamp to [0,1] (seg: threshold 0.5); 3D padding trimmed",
                               seed=self.sc.seed),
                "config": rec["id"], "solver": rec["solver"], "steps": rec["steps"], "tol": rec["tol"],
                "restart": rec["restart"], "nfe": rec["nfe"], "checkpoint": str(self.ck.step_dir)}


# ---- outputs ---------------------------------------------------------------------------------------
def write_table(path: Path, rows: list[dict]) -> Path:
    names = sorted({k for r in rows for k in r["metrics"]})
    lines = ["| config | solver | steps | tol | restart | NFE | " + " | ".join(names) + " |",
             "|---" * (6 + len(names)) + "|"]
    for r in rows:
        rs = "" if not r["restart"] else "K{},n{},[{:g},{:g}]".format(*r["restart"])
        tol = "" if r["tol"] is None else f"{r['tol']:g}"
        steps = "" if r["tol"] is not None else str(r["steps"])
        vals = " | ".join(f"{r['metrics'].get(n, float('nan')):.4f}" for n in names)
        lines.append(f"| {r['id']} | {r['solver']} | {steps} | {tol} | {rs} | {r['nfe']:.1f} | {vals} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path: Path, rows: list[dict], metric: str, title: str = "") -> Path:
    """Metric against NFE (log axis), one coloured line per solver family; drawn with Pillow."""
    from PIL import Image, ImageDraw

    pts = [(r["nfe"], r["metrics"][metric], r["family"]) for r in rows if metric in r["metrics"] and r["nfe"] > 0]
    w, h, left, right, top, bottom = 900, 560, 80, 170, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title or f"{metric} vs NFE", fill="black")
    if not pts:
        img.save(path)
        return path
    xs = [math.log10(p[0]) for p in pts]
    ys = [p[1] for p in pts if math.isfinite(p[1])] or [0.0]
    x0, x1 = min(xs), max(xs)
    x0, x1 = (x0 - 0.1, x1 + 0.1) if x1 - x0 < 1e-9 else (x0, x1)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda v: left + (math.log10(v) - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda v: top + (y1 - v) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):  # y ticks
        v = y0 + (y1 - y0) * k / 4
        d.line([left - 4, sy(v), left, sy(v)], fill="black")
        d.text((8, sy(v) - 6), f"{v:.4g}", fill="black")
    for e in range(math.floor(x0), math.ceil(x1) + 1):  # decades and 2x, 5x
        for m in (1, 2, 5):
            v = m * 10**e
            if x0 <= math.log10(v) <= x1:
                d.line([sx(v), h - bottom, sx(v), h - bottom + 4], fill="black")
                d.text((sx(v) - 8, h - bottom + 8), f"{v:g}", fill="black")
    d.text(((w - right) // 2, h - 22), "NFE (log scale)", fill="black")
    families = list(dict.fromkeys(p[2] for p in pts))
    for j, fam in enumerate(families):
        col = COLOURS[j % len(COLOURS)]
        line = sorted((sx(p[0]), sy(p[1])) for p in pts if p[2] == fam and math.isfinite(p[1]))
        if len(line) > 1:
            d.line(line, fill=col, width=2)
        for px, py in line:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        d.line([w - right + 12, top + 10 + 18 * j, w - right + 32, top + 10 + 18 * j], fill=col, width=3)
        d.text((w - right + 38, top + 4 + 18 * j), fam, fill="black")
    img.save(path)
    return path


def _default_out(ck, name: str) -> Path:
    step = Path(ck.step_dir)
    run = step.parent.parent if step.parent.name == "ckpt" else step.parent
    return run / name / step.name


def solvers(run, out=None, n=4, split=None, data=None, metrics=None, ref="ode", quick=False, restart=True,
            only=None, device=None, batch_size=None, seed=None, weights=None, which=None, steps=None,
            feature_ref="all"):
    """`medgen eval solvers`: yields (metric record, human line) per configuration and metric."""
    from . import sample as sj

    ck, preset = sj._load(sj.checkpoint_ref(run), weights, which)
    metrics = metrics or list(preset.eval.metrics)
    if only:
        from ..solvers import get_solver

        for s in only:
            get_solver(s)
    sw = Sweep(run, Path(out) if out else _default_out(ck, "solver-sweep"), n, split, data, metrics, ref, device,
               batch_size, seed, weights, which, feature_ref)
    if steps and min(steps) < 1:
        raise UsageError(f"--steps must be >= 1, got {min(steps)}", "--steps", "e.g. --steps 10 --steps 25")
    configs = grid(quick, restart, only, steps)
    rows = []
    for cfg in configs:
        rec = sw.evaluate(cfg)
        rows.append(rec)
        for name in rec["metrics"]:
            yield sw.metric_record(rec, name), f"{rec['id']}\tnfe={rec['nfe']:.1f}\t{name}\t{rec['metrics'][name]:.4f}"
    write_table(sw.out / "table.md", rows)
    for name in sorted({k for r in rows for k in r["metrics"]}):
        plot(sw.out / f"nfe-{name}.png", rows, name, f"{name} vs NFE ({Path(sw.ck.step_dir).name}, n={n})")
    log.info("sweep: %d configurations in %s (table.md, nfe-*.png)", len(rows), sw.out)


def golden_section(f, lo: int, hi: int, tol: int = 1, maximise: bool = True) -> tuple[int, dict[int, float]]:
    """Golden-section search for the best integer in [lo, hi]; ``f`` is called once per point (cached).
    Returns (best point evaluated, {point: value})."""
    cache: dict[int, float] = {}

    def g(k: int) -> float:
        if k not in cache:
            v = float(f(k))
            cache[k] = v if maximise else -v
        return cache[k]

    a, b = int(lo), int(hi)
    if a > b:
        raise UsageError(f"empty search range [{lo}, {hi}]", "--lo/--hi", "use --lo <= --hi")
    inv = (math.sqrt(5) - 1) / 2
    while b - a > max(int(tol), 3):
        c, d = round(b - inv * (b - a)), round(a + inv * (b - a))
        if c >= d:
            d = c + 1
        if g(c) >= g(d):
            b = d
        else:
            a = c
    for k in range(a, b + 1):
        g(k)
    best = max(cache, key=lambda k: (cache[k], -k))  # ties: fewer steps
    return best, {k: (v if maximise else -v) for k, v in cache.items()}


def optimal_steps(run, metric="psnr", solver="euler", lo=10, hi=50, tol=1, out=None, n=4, split=None, data=None,
                  ref="ode", device=None, batch_size=None, seed=None, weights=None, which=None, feature_ref="all"):
    """`medgen eval optimal-steps`: golden-section over the step count; cached points are reused."""
    from ..solvers import ADAPTIVE, get_solver
    from . import sample as sj

    get_solver(solver)
    if solver in ADAPTIVE:
        raise UsageError(f"'{solver}' chooses its own steps", "--solver", "search a fixed-step solver")
    if lo < 1:
        raise UsageError(f"--lo must be >= 1, got {lo}", "--lo", "e.g. --lo 10 --hi 50")
    ck, _ = sj._load(sj.checkpoint_ref(run), weights, which)
    sw = Sweep(run, Path(out) if out else _default_out(ck, "solver-sweep"), n, split, data, [metric], ref, device,
               batch_size, seed, weights, which, feature_ref)
    best, seen = golden_section(lambda k: sw.evaluate(Config(solver, k)).get("metrics", {})[metric], lo, hi, tol,
                                HIGHER_IS_BETTER.get(metric, True))
    for k in sorted(seen):
        rec = sw.results[Config(solver, k).id]
        yield {**sw.metric_record(rec, metric), "best": k == best}, \
            f"{solver}-{k}\tnfe={rec['nfe']:.1f}\t{metric}\t{seen[k]:.4f}" + ("\tbest" if k == best else "")
    log.info("optimal steps for %s by %s: %d (%s = %.4f; %d points evaluated)", solver, metric, best, metric,
             seen[best], len(seen))
