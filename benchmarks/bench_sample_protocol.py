"""The reference test protocol for 2D: N samples × S Euler steps through medgen's sampler and the
sampling fast path (bf16 weights, channels-last, torch.compile, CUDA graphs), random weights.

    python benchmarks/bench_sample_protocol.py [--preset 2d-pixel-128] [--n 1000] [--steps 50] [--batches 125 16]

Prints one JSON line per batch size: the first batch (compiling included) and the seconds for all N
samples after it. Needs a CUDA GPU. File writing (NIfTI/PNG) is not included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2d-pixel-128")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[125, 16])
    a = ap.parse_args()
    from medgen_cli.config import load
    from medgen_cli.engine.fastpath import FastNet
    from medgen_cli.engine.sampling import generate
    from medgen_cli.runtime import autocast

    dev = torch.device("cuda")
    preset = load(a.preset).preset
    image, cond = bench_unet.batch_for(preset, dev)
    tr, _ = bench_unet.medgen_step(preset, dev, image, cond)
    fast = FastNet(tr.model.eval(), dev)
    for bs in a.batches:
        batches = -(-a.n // bs)
        c = (torch.rand(bs, *cond.shape[1:], device=dev) > 0.99).float()
        noise = torch.randn(bs, *image.shape[1:], device=dev)
        t = time.perf_counter()
        generate(fast, tr.strategy, noise, c, "euler", a.steps, autocast(dev, "bf16"))
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(batches):
            x = generate(fast, tr.strategy, torch.randn_like(noise), c, "euler", a.steps, autocast(dev, "bf16"))[0]
        torch.cuda.synchronize()
        print(json.dumps({"preset": a.preset, "batch": bs, "samples": batches * bs, "steps": a.steps,
                          "first_batch_s": round(first, 2), "seconds": round(time.perf_counter() - t, 2),
                          "finite": bool(torch.isfinite(x).all()), "device": torch.cuda.get_device_name()}),
              flush=True)


if __name__ == "__main__":
    main()
