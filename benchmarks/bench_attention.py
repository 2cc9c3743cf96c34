"""Scaled dot-product attention by backend, at the shapes medgen's UNets give it (bf16, one H200).

MONAI's attention blocks call ``F.scaled_dot_product_attention`` on (batch, heads, tokens, head dim);
PyTorch picks a backend (cuDNN, FlashAttention-2, memory-efficient) by its own priority. This times the
forward and forward+backward of each backend alone, so a choice can be made from figures.

    python benchmarks/bench_attention.py [--shapes 16x1x4096x256 16x1x1024x256] [--iters 20]

Prints one JSON object per shape: milliseconds per forward and per forward+backward for each backend
(null where the backend refuses the shape) and the TFLOP/s of the forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from bench_conv import ms  # noqa: E402  (CUDA-event milliseconds per call after 3 warm-ups)

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["16x1x4096x256", "16x1x1024x256"],
                    help="batch x heads x tokens x head-dim (defaults: 2d-pixel-128's two attention levels)")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    for shape in a.shapes:
        B, H, S, D = map(int, shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        flop = 4 * B * H * S * S * D * 3.5  # forward 4·B·H·S²·D, backward 2.5× that
        out = {"shape": shape, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    fwd = ms(lambda: F.scaled_dot_product_attention(q, k, v), a.iters)
                    both = ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), g),
                              a.iters)
                out[name] = {"fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(both, 3),
                             "fwd_bwd_tflops": round(flop / both / 1e9, 1)}
            except RuntimeError as e:  # the backend does not take this shape or dtype
                out[name] = None
                out[name + "_refused"] = str(e).splitlines()[0][:120]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
