"""Data-parallel scaling: medgen's training step under torchrun on 1 and N GPUs, same per-GPU batch.

    torchrun --nproc-per-node 1 benchmarks/bench_ddp.py --preset 3d-pixel-128
    torchrun --nproc-per-node 2 benchmarks/bench_ddp.py --preset 3d-pixel-128

Each rank runs medgen's own Trainer step (keyed noise, DDP gradient all-reduce, clipping, AdamW,
EMA when on) on random tensors of the preset's shape; the global batch is the per-GPU batch times
the world size. Rank 0 prints one JSON line: seconds per step and samples per second. Scaling =
samples/s on N GPUs ÷ samples/s on one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from bench_unet import Synthetic, batch_for

    from medgen_cli.config import load
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build
    from medgen_cli.runtime import init_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="3d-pixel-128")
    ap.add_argument("--per-gpu-batch", type=int, default=None, help="default: the preset's batch size")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) for a smoke run of a small preset")
    args = ap.parse_args()
    world, dev = init_world(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = load(args.preset, args.set).preset
    per_gpu = args.per_gpu_batch or base.train.batch_size
    preset = load(args.preset, [*args.set, f"train.batch_size={per_gpu * world.size}"]).preset
    torch.backends.cudnn.benchmark = True
    image, cond = batch_for(preset, dev)
    image, cond = image[:1].expand(per_gpu, *image.shape[1:]).contiguous(), cond[:1].expand(
        per_gpu, *cond.shape[1:]).contiguous()
    ds = Synthetic(image, cond)
    tr = Trainer(build.build_model(preset), build.build_strategy(preset), ds, ds, preset.train,
                 f"/tmp/medgen-bench-ddp-{world.rank}", "{}", dev, world=world)
    for _ in range(3):
        tr._step(image, cond)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        stats = tr._step(image, cond)
    float(stats["loss"])
    sync()
    s = (time.perf_counter() - t0) / args.iters
    if world.main:
        print(json.dumps({"preset": args.preset, "sets": args.set, "world": world.size, "per_gpu_batch": per_gpu,
                          "step_s": s, "samples_per_s": per_gpu * world.size / s,
                          "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}), flush=True)
    if world.size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
