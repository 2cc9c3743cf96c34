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
    ap.add_argument("--ddp-option", action="append", default=[], metavar="KEY=JSON",
                    help="an extra DistributedDataParallel argument to try, e.g. gradient_as_bucket_view=true")
    ap.add_argument("--profile", action="store_true", help="rank 0 also profiles steps (profile_step.py's summary)")
    ap.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on", help="cuDNN autotuning (default on)")
    args = ap.parse_args()
    if args.ddp_option:  # the Trainer builds DDP through torch.nn.parallel: hand it the extra arguments
        import functools

        import torch.nn.parallel as tnp

        extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.ddp_option)}
        tnp.DistributedDataParallel = functools.partial(tnp.DistributedDataParallel, **extra)
    world, dev = init_world(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = load(args.preset, args.set).preset
    per_gpu = args.per_gpu_batch or base.train.batch_size
    preset = load(args.preset, [*args.set, f"train.batch_size={per_gpu * world.size}"]).preset
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    image, cond = batch_for(preset, dev)
    image, cond = image[:1].expand(per_gpu, *image.shape[1:]).contiguous(), cond[:1].expand(
        per_gpu, *cond.shape[1:]).contiguous()
    ds = Synthetic(image, cond)
    tr = Trainer(build.build_model(preset), build.build_strategy(preset), ds, ds, preset.train,
                 f"/tmp/medgen-bench-ddp-{world.rank}", "{}", dev, world=world,
                 space=build.build_space(preset, ds))  # s2d / wavelet presets train in their space
    for _ in range(3):
        tr._step(image, cond)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        stats = tr._step(image, cond)
    float(stats["loss"])
    sync()
    s = (time.perf_counter() - t0) / args.iters
    out = {"preset": args.preset, "sets": args.set, "ddp_options": args.ddp_option,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "world": world.size,
           "parallel": tr.parallel.kind, "graph_steps": tr._graph_steps,
           "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],  # graphs refused
           "per_gpu_batch": per_gpu, "step_s": s, "samples_per_s": per_gpu * world.size / s,
           "omp_threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    if args.profile and dev.type == "cuda":  # every rank steps (collectives); rank 0 keeps the summary
        from profile_step import profile

        out["profile"] = profile(lambda: tr._step(image, cond), 5)
    if world.main:
        print(json.dumps(out), flush=True)
    if world.size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
