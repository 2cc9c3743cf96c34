"""The 3D UNet's convolutions one by one, in several exact formulations (which one does cuDNN run fast?).

    python benchmarks/bench_conv.py [--size 256] [--depth 160] [--iters 20] [--backward]

The 3d-pixel-256 evaluation spends 42 of its 46 ms in convolutions (`profile_step.py`), most of it in
the full-resolution ones with 1–32 channels, where tensor-core tiles are mostly empty. For each conv of
the UNet's first two levels this times, bf16, batch 1:

- ``ndhwc``: ``F.conv3d`` on channels-last-3d tensors (what the compiled model runs);
- ``ncdhw``: the same on contiguous tensors;
- ``pad8``: channels zero-padded to 8 (exact: the padding weights are zero): the output channels of
  the 1-channel output conv (``engine.fastpath._PaddedOutConv3d``, kept), the input channels of the
  2-channel input conv (tried, not kept);
- ``fold2d``: the 3×3×3 conv as one 2D conv over the depth-stacked neighbours
  (``engine.fastpath._DepthFoldConv3d``; kept for the input conv only), exact up to summation order;
- ``triton`` (with ``--triton``, forward only): Inductor's own Triton convolution template, autotuned over
  its block configurations (``torch.compile`` with ``max_autotune``, conv backend TRITON only): what
  ``FastNet(autotune_convs=True)`` would let Inductor pick instead of cuDNN;
- ``sweep<rows>x<width>`` (with ``--triton``, forward, 3×3×3 convs): ``engine.triton_conv.conv3x3x3``,
  our kernel, at the strip sizes in ``STRIPS`` (``triton_conv.FORWARD`` holds the one TritonConv3d uses);
  with ``--backward`` also the weight gradient alone, cuDNN's against ``conv3x3x3_weight_grad``
  (``sweep…_wgrad``). (Session 8's ``ours<rows>x<width>`` columns timed a first, tiled kernel, since
  removed.)

Prints one JSON line per conv with milliseconds per call and the largest difference from ``ndhwc``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medgen_cli.engine.fastpath import _DepthFoldConv3d, _PaddedOutConv3d, to_channels_last  # noqa: E402


def ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def conv_module(cin: int, cout: int, k: int, swap=None) -> nn.Conv3d:
    """A bf16 CUDA ``nn.Conv3d`` (padding k//2), its class swapped for one of ``engine.fastpath``'s exact
    equivalents when ``swap`` is given (same parameters)."""
    torch.manual_seed(0)
    m = nn.Conv3d(cin, cout, k, padding=k // 2).to("cuda", torch.bfloat16)
    if swap is not None:
        m.__class__ = swap
    return m


def pad_in8(m: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Tried and not kept: input channels zero-padded to 8 (zero weights), exact."""
    extra = 8 - m.in_channels
    xp = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], 1).contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.cat([m.weight, m.weight.new_zeros(m.out_channels, extra, *m.weight.shape[2:])], 1)
    return F.conv3d(xp, w.contiguous(memory_format=torch.channels_last_3d), m.bias, padding=m.padding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=160)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--triton", action="store_true",
                    help="also time Inductor's autotuned Triton conv template and our kernels")
    ap.add_argument("--only", default="", help="comma-separated conv names to run (default: all)")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    full = (a.depth, a.size, a.size)
    half = tuple(s // 2 for s in full)
    # (name, C_in, C_out, kernel, spatial): the UNet's first two levels, [16, 32, ...] channels
    convs = [("conv_in", 2, 16, 3, full), ("res0", 16, 16, 3, full), ("up0_in", 32, 16, 3, full),
             ("up0_skip", 32, 16, 1, full), ("upsample1", 32, 32, 3, full), ("out", 16, 1, 3, full),
             ("res1", 32, 32, 3, half), ("up1_in", 64, 32, 3, half)]
    only = set(filter(None, a.only.split(",")))
    for name, cin, cout, k, sp in convs:
        if only and name not in only:
            continue
        x = torch.randn(1, cin, *sp, device=dev, dtype=torch.bfloat16)
        xl = x.contiguous(memory_format=torch.channels_last_3d)
        base = conv_module(cin, cout, k)
        mods = {"ndhwc": (to_channels_last(conv_module(cin, cout, k)), xl), "ncdhw": (base, x)}
        if k == 3:
            mods["fold2d"] = (to_channels_last(conv_module(cin, cout, k, _DepthFoldConv3d)), xl)
        if cout < 8:
            mods["pad8"] = (to_channels_last(conv_module(cin, cout, k, _PaddedOutConv3d)), xl)
        forms = {f: (lambda m=m, inp=inp: m(inp)) for f, (m, inp) in mods.items()}
        if cin < 8:
            forms["pad8"] = lambda: pad_in8(base, xl)
        if a.triton:
            opts = {"max_autotune": True, "max_autotune_conv_backends": "TRITON"}
            compiled = torch.compile(to_channels_last(conv_module(cin, cout, k)), dynamic=False, options=opts)
            forms["triton"] = lambda m=compiled: m(xl)
            if k == 3:
                from medgen_cli.engine.triton_conv import STRIPS, conv3x3x3

                for rows, bw in STRIPS:
                    forms[f"sweep{rows}x{bw}"] = lambda m=base, rows=rows, bw=bw: conv3x3x3(xl, m.weight, m.bias,
                                                                                           rows, bw)
        row = {"conv": name, "cin": cin, "cout": cout, "k": k, "spatial": sp,
               "gflop": round(2 * cin * cout * k ** 3 * sp[0] * sp[1] * sp[2] / 1e9, 1)}
        with torch.no_grad():
            ref = forms["ndhwc"]().float()
            for f, fn in forms.items():
                row[f + "_ms"] = round(ms(fn, a.iters), 3)
                row[f + "_maxdiff"] = float((fn().float() - ref).abs().max())
        if a.backward:
            for f, fn in forms.items():
                if f == "triton" or f.startswith("sweep"):  # forward-only kernels
                    continue
                inp = mods[f][1] if f in mods else xl
                weight = (mods[f][0] if f in mods else base).weight

                def step(fn=fn, inp=inp, weight=weight):
                    inp.requires_grad_(True)
                    y = fn()
                    torch.autograd.grad(y, (inp, weight), torch.ones_like(y))
                row[f + "_fwdbwd_ms"] = round(ms(step, a.iters), 3)
                inp.requires_grad_(False)
            if a.triton and k == 3:  # the weight gradient alone: cuDNN's against our tap-wise kernel
                from medgen_cli.engine.triton_conv import STRIPS, conv3x3x3_weight_grad

                up = torch.randn(1, cout, *sp, device=dev, dtype=torch.bfloat16).contiguous(
                    memory_format=torch.channels_last_3d)
                wl = to_channels_last(conv_module(cin, cout, k)).weight
                with torch.no_grad():
                    cudnn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
                        up, xl, wl, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, [False, True, False])[1]
                    row["cudnn_wgrad_ms"] = round(ms(cudnn, a.iters), 3)
                    ref_w = cudnn().float()
                    for rows, bw in STRIPS:
                        fn = lambda rows=rows, bw=bw: conv3x3x3_weight_grad(xl, up, rows, bw)  # noqa: E731
                        row[f"sweep{rows}x{bw}_wgrad_ms"] = round(ms(fn, a.iters), 3)
                        row[f"sweep{rows}x{bw}_wgrad_relerr"] = float((fn() - ref_w).abs().max() / ref_w.abs().max())
        print(json.dumps(row), flush=True)
        del x, xl, mods, forms, base, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
