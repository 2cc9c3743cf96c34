"""How much of a training step is compute when the batches come from a real-layout dataset.

    python benchmarks/bench_input.py --preset 2d-pixel-128 [--set train.compile=true ...] [--steps 60]

Writes phantoms in the BrainMetShare layout (256×256×150 ``.nii.gz``, ``medgen data synth``) unless
--data names a dataset, builds the preset's datasets and Trainer the way ``medgen train`` does, and
times, after warm-up:

- ``loop``: the training loop's per-step work — the next batch from the trainer's own loader
  (``data.num_workers``, or its automatic choice), the step, and a logged (host-synced) loss every
  ``train.log_every`` steps, as ``Trainer.fit`` does;
- ``compute``: the same step on one batch already on the GPU.

``compute_share`` = compute ÷ loop (target ≥ 0.95). Also printed: seconds to build the datasets
(first read through the preprocessing cache, then again from it), the host's own time to assemble
one batch, and the first epoch's loop time per step (cold: 3D volumes are read on first access).
One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from bench_unet import sync

    from medgen_cli.config import load
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build
    from medgen_cli.jobs.data import synth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2d-pixel-128")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--data", default=None, help="a BrainMetShare-layout folder (default: phantoms written now)")
    ap.add_argument("--patients", type=int, default=6, help="training patients to synthesise")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="medgen-bench-input-"))
    os.environ.setdefault("MEDGEN_CACHE", str(work / "cache"))
    t = time.perf_counter()
    root = Path(args.data) if args.data else synth(work / "data", args.patients, 1, 0)
    synth_s = time.perf_counter() - t

    p = load(args.preset, args.set).preset
    p.data.root = str(root)
    t = time.perf_counter()
    train_ds = build.build_dataset(p, p.data.train_split, root, train=True)
    build_cold_s = time.perf_counter() - t
    t = time.perf_counter()
    build.build_dataset(p, p.data.train_split, root, train=True)
    build_warm_s = time.perf_counter() - t
    val_ds = build.build_dataset(p, p.data.val_split, root)
    torch.backends.cudnn.benchmark = True
    tr = Trainer(build.build_model(p), build.build_strategy(p), train_ds, val_ds, p.train, str(work / "run"),
                 build.config_json(p), dev, num_workers=p.data.workers(dev.type == "cuda"))

    batches = tr._batches(0)  # epoch after epoch, as Trainer.fit reads them

    def steps(n: int, batch) -> float:
        """Seconds per step over ``n`` steps on ``batch()``, with Trainer.fit's logged (synced) losses."""
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            stats = tr._step(*batch())
            if tr.state.step % p.train.log_every == 0:
                float(stats["loss"])
        sync()
        return (time.perf_counter() - t0) / n

    from_loader = lambda: next(batches)  # noqa: E731
    cold_s = steps(min(tr.steps_per_epoch, args.steps), from_loader)  # compiles when on; not in the share
    steps(args.warmup, from_loader)
    loop_s = steps(args.steps, from_loader)
    resident = next(batches)
    steps(args.warmup, lambda: resident)
    compute_s = steps(args.steps, lambda: resident)
    items = tr._epoch_batches(0)[0]
    t0 = time.perf_counter()
    for _ in range(5):
        [train_ds[i] for i in items]
    host_batch_s = (time.perf_counter() - t0) / 5
    b = p.train.batch_size
    print(json.dumps({
        "preset": args.preset, "sets": args.set, "batch": b, "train_items": len(train_ds),
        "steps_per_epoch": tr.steps_per_epoch, "num_workers": tr.num_workers,
        "synth_s": round(synth_s, 2), "build_datasets_cold_s": round(build_cold_s, 2),
        "build_datasets_warm_s": round(build_warm_s, 2), "first_epoch_step_s": round(cold_s, 4),
        "loop_step_s": round(loop_s, 5), "compute_step_s": round(compute_s, 5),
        "compute_share": round(compute_s / loop_s, 4), "host_batch_s": round(host_batch_s, 5),
        "images_per_s_loop": round(b / loop_s, 1),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}), flush=True)


if __name__ == "__main__":
    main()
