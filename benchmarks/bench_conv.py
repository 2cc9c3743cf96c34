"""The 3D UNet's convolutions one by one, in several exact formulations (which one does cuDNN run fast?).

    python benchmarks/bench_conv.py [--size 256] [--depth 160] [--iters 20] [--backward]

The 3d-pixel-256 evaluation spends 42 of its 46 ms in convolutions (`profile_step.py`), most of it in
the full-resolution ones with 1–32 channels, where tensor-core tiles are mostly empty. For each conv of
the UNet's first two levels this times, bf16, batch 1:

- ``ndhwc``: ``F.conv3d`` on channels-last-3d tensors (what the compiled model runs);
- ``ncdhw``: the same on contiguous tensors;
- ``pad8``: input and/or output channels zero-padded to a multiple of 8 (exact: the padding weights
  are zero), for the 2-channel input conv and the 1-channel output conv that fall back to a non-tensor-
  core kernel;
- ``fold2d``: the 3×3×3 conv as one 2D conv over the depth-stacked neighbours (input (D, 3C, H, W),
  weight (C_out, 3C, 3, 3)), exact up to summation order.

Prints one JSON line per conv with milliseconds per call and the largest difference from ``ndhwc``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


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


def pad_channels(x: torch.Tensor, to: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if n >= to:
        return x
    shape = list(x.shape)
    shape[dim] = to - n
    return torch.cat([x, x.new_zeros(shape)], dim)


def conv_pad8(x, w, b):
    """Exact: zero input channels with zero weights; extra output channels sliced off."""
    cin, cout = w.shape[1], w.shape[0]
    cin8, cout8 = -(-cin // 8) * 8, -(-cout // 8) * 8
    wp = pad_channels(pad_channels(w, cin8, 1), cout8, 0)
    bp = pad_channels(b, cout8, 0)
    xp = pad_channels(x, cin8, 1).contiguous(memory_format=torch.channels_last_3d)
    return F.conv3d(xp, wp.contiguous(memory_format=torch.channels_last_3d), bp, padding=w.shape[-1] // 2)[:, :cout]


def conv_fold2d(x, w, b):
    """3×3×3 conv (padding 1) as a 2D conv over (depth-1, depth, depth+1) stacked as channels."""
    B, C, D, H, W = x.shape
    xl = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C) view of a channels-last tensor
    xp = F.pad(xl, (0, 0, 0, 0, 0, 0, 1, 1))  # zero slices before and after along D
    stacked = torch.cat([xp[:, 0:D], xp[:, 1:D + 1], xp[:, 2:D + 2]], dim=-1)  # (B, D, H, W, 3C)
    inp = stacked.reshape(B * D, H, W, 3 * C).permute(0, 3, 1, 2)  # NCHW view, channels-last strides
    w2 = w.permute(0, 2, 1, 3, 4).reshape(w.shape[0], 3 * C, 3, 3).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(inp, w2, b, padding=1)  # (B·D, Cout, H, W)
    return y.reshape(B, D, w.shape[0], H, W).permute(0, 2, 1, 3, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=160)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    full = (a.depth, a.size, a.size)
    half = tuple(s // 2 for s in full)
    # (name, C_in, C_out, kernel, spatial): the UNet's first two levels, [16, 32, ...] channels
    convs = [("conv_in", 2, 16, 3, full), ("res0", 16, 16, 3, full), ("up0_in", 32, 16, 3, full),
             ("up0_skip", 32, 16, 1, full), ("upsample1", 32, 32, 3, full), ("out", 16, 1, 3, full),
             ("res1", 32, 32, 3, half), ("up1_in", 64, 32, 3, half)]
    for name, cin, cout, k, sp in convs:
        x = torch.randn(1, cin, *sp, device=dev, dtype=torch.bfloat16)
        w = torch.randn(cout, cin, k, k, k, device=dev, dtype=torch.bfloat16) / (cin * k ** 3) ** 0.5
        b = torch.randn(cout, device=dev, dtype=torch.bfloat16)
        xl, wl = x.contiguous(memory_format=torch.channels_last_3d), w.contiguous(memory_format=torch.channels_last_3d)
        forms = {"ndhwc": lambda x=xl, w=wl: F.conv3d(x, w, b, padding=k // 2),
                 "ncdhw": lambda: F.conv3d(x, w, b, padding=k // 2)}
        if cin % 8 or cout % 8:
            forms["pad8"] = lambda: conv_pad8(xl, w, b)
        if k == 3:
            forms["fold2d"] = lambda: conv_fold2d(xl, w, b)
        ref = forms["ndhwc"]().float()
        row = {"conv": name, "cin": cin, "cout": cout, "k": k, "spatial": sp,
               "gflop": round(2 * cin * cout * k ** 3 * sp[0] * sp[1] * sp[2] / 1e9, 1)}
        with torch.no_grad():
            for f, fn in forms.items():
                row[f + "_ms"] = round(ms(fn, a.iters), 3)
                row[f + "_maxdiff"] = float((fn().float() - ref).abs().max())
        if a.backward:
            for f, fn in forms.items():
                xg = (xl if f != "ncdhw" else x).detach().requires_grad_(True)
                wg = (wl if f == "ndhwc" else w).detach().requires_grad_(True)
                fb = {"ndhwc": lambda: F.conv3d(xg, wg, b, padding=k // 2),
                      "ncdhw": lambda: F.conv3d(xg, wg, b, padding=k // 2),
                      "pad8": lambda: conv_pad8(xg, wg, b), "fold2d": lambda: conv_fold2d(xg, wg, b)}[f]

                def step(fb=fb, xg=xg, wg=wg):
                    y = fb()
                    gx, gw = torch.autograd.grad(y, (xg, wg), torch.ones_like(y))
                row[f + "_fwdbwd_ms"] = round(ms(step, a.iters), 3)
        print(json.dumps(row), flush=True)
        del x, w, xl, wl, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
