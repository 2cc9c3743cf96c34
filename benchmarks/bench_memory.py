"""The memory planner against the GPU: predicted vs measured peak memory of medgen's own training step.

For each case (a preset, optionally with `--set` overrides) it predicts with engine/planner.py (fake
tensors on the CPU, as `medgen train --dry-run` does), then runs medgen's `Trainer._step` on random
tensors on the GPU and measures `torch.cuda.max_memory_allocated` / `max_memory_reserved` over a few
steps after warm-up. With phases on (the default), the epoch-end phases are measured too, through the
same code the training loop runs: `Trainer.validate()` (train.batch_size items per forward) and the
preview grid (`jobs/train.py` `_preview`: 4 items, 10 Euler steps). Prints one JSON object per case
and a final summary line; `ok` is true when every relative error is within `--tolerance` (15 %).

    PYTHONPATH=$PWD python benchmarks/bench_memory.py [--case 3d-pixel-256:model.gradient_checkpointing=false ...]
        [--steps 3] [--no-phases] [--tolerance 0.15]

Needs a CUDA GPU and no data files (random tensors). Cases default to 3d-pixel-128 and 3d-pixel-256 with
and without gradient checkpointing, 2d-pixel-128 and 2d-pixel-256.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_unet import Synthetic  # noqa: E402  (the benchmarks share their stand-in dataset)

GIB = 2**30
DEVICE = torch.device("cuda")  # --smoke-cpu: the CPU (code paths only; peaks read as 0)
DEFAULT_CASES = ["3d-pixel-128", "3d-pixel-128:model.gradient_checkpointing=false", "3d-pixel-256",
                 "3d-pixel-256:model.gradient_checkpointing=false", "2d-pixel-128", "2d-pixel-256"]


def load_case(case: str):
    """``NAME[:key=value,key=value]`` → the preset, with settings a benchmark cannot satisfy turned off."""
    from medgen_cli.config import load

    name, _, rest = case.partition(":")
    sets = [s for s in rest.split(",") if s]
    p = load(name, sets).preset
    notes = []
    if getattr(p.compat, "val_perceptual", False):  # needs RadImageNet weights; the planner does not count it
        p.compat.val_perceptual = False
        notes.append("compat.val_perceptual turned off (weights not needed to measure memory)")
    return name, sets, p, notes


def predict(p) -> dict:
    from medgen_cli.engine import planner

    t0 = time.perf_counter()
    sim = planner.simulate(p)
    est = planner.gpu_estimate(sim, 1, "none", p.train.ema.enabled, steady=False)
    out = {f"predicted_{k}_gib": v / GIB for k, v in est.phases.items()}
    out["predicted_train_reserved_gib"] = est.phases["train"] * est.reserved_factor / GIB
    out["predicted_host_process_and_model_gib"] = (planner.HOST_PROCESS_CUDA + sim.param_bytes) / GIB
    out["planner_method"] = sim.how
    out["planner_s"] = time.perf_counter() - t0
    return out


def peak(fn) -> tuple[float, float]:
    """(max allocated, max reserved) in GiB while ``fn`` runs, from an emptied cache."""
    gc.collect()
    if DEVICE.type != "cuda":
        fn()
        return 0.0, 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def measure(p, steps: int, phases: bool, run_dir: str) -> dict:
    """medgen's Trainer on random tensors: warm-up steps, then peaks of steps (and of the epoch-end phases)."""
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build
    from medgen_cli.jobs.train import _preview

    dev = DEVICE
    d = p.data
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    img_c, cond_c = p.channels()
    b = p.train.batch_size
    image = torch.rand((b, img_c, *spatial), device=dev)
    cond = (torch.rand((b, cond_c, *spatial), device=dev) > 0.99).float()
    ds = Synthetic(image, cond, max(b, 4))
    out = {}
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, run_dir, build.config_json(p), dev,
                 space=build.build_space(p) if p.space.kind != "pixel" and not p.space.normalize else None)
    try:
        for _ in range(2):  # warm-up: optimizer state, cuDNN/cuBLAS handles, autotuning
            tr._step(image, cond)
        if dev.type == "cuda":
            torch.cuda.synchronize()

        def train():
            for _ in range(steps):
                tr._step(image, cond)["loss"].item()

        t0 = time.perf_counter()
        out["measured_train_gib"], out["measured_train_reserved_gib"] = peak(train)
        out["step_s"] = (time.perf_counter() - t0) / steps
        if phases:
            out["measured_validate_gib"], _ = peak(tr.validate)
            out["measured_preview_gib"], _ = peak(lambda: _preview(tr, 0))
    except torch.OutOfMemoryError as e:
        out["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del tr
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def compare(rec: dict, tolerance: float) -> None:
    errs = {}
    for phase in ("train", "train_reserved", "validate", "preview"):
        m, p = rec.get(f"measured_{phase}_gib"), rec.get(f"predicted_{phase}_gib")
        if m and p is not None:  # (0 in --smoke-cpu)
            errs[phase] = (p - m) / m
    rec["rel_err"] = {k: round(v, 4) for k, v in errs.items()}
    rec["ok"] = bool(errs) and "error" not in rec and all(abs(v) <= tolerance for v in errs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="PRESET[:key=value,...] (repeatable); default: " +
                    " ".join(DEFAULT_CASES))
    ap.add_argument("--steps", type=int, default=3, help="measured training steps (after 2 warm-up steps)")
    ap.add_argument("--no-phases", action="store_true", help="skip the validation and preview measurements")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--cudnn-benchmark", choices=("on", "off"), default="off",
                    help="cuDNN autotuning while measuring (default off, as the CLI)")
    ap.add_argument("--smoke-cpu", action="store_true", help="run the code paths on the CPU (no measurements)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    global DEVICE
    if args.smoke_cpu:
        DEVICE = torch.device("cpu")
        env = {"gpu": None, "gpu_total_gib": None, "torch": torch.__version__}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --smoke-cpu)")
        props = torch.cuda.get_device_properties(0)
        env = {"gpu": props.name, "gpu_total_gib": props.total_memory / GIB, "torch": torch.__version__}
    results, seen = [], set()
    for case in args.case or DEFAULT_CASES:
        name, sets, p, notes = load_case(case)
        rec = {"case": case, "preset": name, "sets": sets, **env, "batch_size": p.train.batch_size,
               "gradient_checkpointing": bool(getattr(p.model, "gradient_checkpointing", False)),
               "precision": p.train.precision, "cudnn_benchmark": torch.backends.cudnn.benchmark,
               "notes": notes}
        phases = not args.no_phases and name not in seen  # validation and preview do not depend on checkpointing
        seen.add(name)
        try:
            rec.update(predict(p))
        except Exception as e:  # report and go on: the measurement still says something
            rec["predict_error"] = f"{type(e).__name__}: {e}"
        with tempfile.TemporaryDirectory(prefix="medgen-bench-mem-") as run_dir:
            rec.update(measure(p, args.steps, phases, run_dir))
        rec["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        compare(rec, args.tolerance)
        results.append(rec)
        print(json.dumps(rec), flush=True)
    worst = max((abs(v) for r in results for v in r.get("rel_err", {}).values()), default=None)
    print(json.dumps({"summary": True, "cases": len(results), "all_ok": all(r["ok"] for r in results),
                      "worst_abs_rel_err": worst}), flush=True)


if __name__ == "__main__":
    main()
