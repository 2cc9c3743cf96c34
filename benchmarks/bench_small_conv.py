"""The 2D UNet's few-channel convolutions (conv_in 2 → 128, conv_out 128 → 1) by backend, bf16, channels-last.

cuDNN's weight gradient for these reduces over N·H·W positions on a handful of thread blocks; the
shift-GEMM (``engine.fastpath._ShiftGemmConv``) writes the small side's shifted windows and runs one GEMM.
Times forward + backward (input gradient where the layer has one, weight and bias gradients) per call,
eager and under ``torch.compile``.

    python benchmarks/bench_small_conv.py [--batch 16 --size 128 --iters 20]

Prints one JSON object per conv: milliseconds per forward+backward for cuDNN and the shift-GEMM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_conv import ms  # noqa: E402
from medgen_cli.engine.fastpath import _ShiftGemmConv, channels_last, to_channels_last  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    for name, cin, cout, input_grad in (("conv_in", 2, 128, False), ("conv_out", 128, 1, True)):
        x = channels_last(torch.randn(a.batch, cin, a.size, a.size, device=dev, dtype=torch.bfloat16))
        x.requires_grad_(input_grad)
        g = channels_last(torch.randn(a.batch, cout, a.size, a.size, device=dev, dtype=torch.bfloat16))
        out = {"conv": name, "shape": list(x.shape), "out_channels": cout, "device": torch.cuda.get_device_name()}
        ref = None
        for variant in ("cudnn", "shift_gemm"):
            m = to_channels_last(nn.Conv2d(cin, cout, 3, padding=1).to(dev, torch.bfloat16))
            if variant == "shift_gemm":
                m.__class__ = _ShiftGemmConv
            for mode, f in (("eager", m), ("compiled", torch.compile(m))):
                def step():
                    m.zero_grad(set_to_none=True)
                    f(x).backward(g)
                out[f"{variant}_{mode}_ms"] = round(ms(step, a.iters), 4)
            step()
            gw = m.weight.grad.float()
            if ref is None:
                ref = gw
            else:
                out["weight_grad_rel_err"] = float((gw - ref).norm() / ref.norm())
        print(json.dumps(out))


if __name__ == "__main__":
    main()
