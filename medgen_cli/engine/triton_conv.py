"""Triton kernels for the 3D UNet's small full-resolution 3×3×3 convolutions: forward, input and weight
gradients.

Why: cuDNN spends 2.7–3.3 ms on each 3×3×3 convolution of a 16–32-channel 256×256×160 volume whatever
its channel count, where moving the tensors takes ~0.15 ms (benchmarks/NOTES.md, session 6); nine of
them put a floor of ~26 ms under every 256³ evaluation. Ours (session 9, H200, bf16): 2→16 0.46 ms
against 3.1, 16→16 1.16 against 2.76, weight gradients 0.78 and 1.39 against 1.94 and 2.08; at 32→16
cuDNN wins (2.63 against our best 2.77), so only convolutions of ≤ 16 channels are swapped.

How (channels-last tensors): a program owns a strip of ``rows`` output rows × ``block_w`` positions
along W of one output plane ``(n, d)``, all output channels, and walks down it one input row at a time.
An input row is, in channels-last memory, a contiguous run of ``W × C_in`` values, and its three kw taps
are folded into the reduction: ``A[w, j] = row[(w - 1) · C_in + j]`` for ``j < 3 · C_in`` is exactly the
im2col block of positions ``w - 1, w, w + 1``, read with one coalesced load, and the weights are
re-ordered to match (``j = kw · C_in + c``, zero rows up to a power of two). Input row r of plane
d + kd − 1 feeds output rows r − 1, r, r + 1 through taps kh = 2, 1, 0, so each input row is read once
per kd (3 times in all, where a tile per output row reads it 9 times: session 8's first kernel, 1.52 ms
at 16→16) and three float32 accumulators ``[block_w, C_out]`` roll down with it, one tensor-core product
``[block_w, K] @ [K, C_out]`` per (row, tap); the bias is added once. The input gradient of such a
convolution is another one (flipped taps, swapped channels): the same kernel. The weight gradient
(:func:`conv3x3x3_weight_grad`) sweeps the same strips keeping three output-gradient rows rolling instead,
and sums ``Aᵀ @ grad`` for all nine taps in one program.

Exact up to the summation order (float32 accumulation; the weight gradient's atomic adds make its last
bits vary from run to run). ``exact_fast_ops`` swaps :class:`TritonConv3d` in on CUDA (sampling fast
path and ``train.compile``; ``MEDGEN_TRITON_CONVS=0`` keeps cuDNN). Runs anywhere Triton runs, including
``TRITON_INTERPRET=1`` on the CPU (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIPS = [(16, 64), (32, 32), (32, 64), (32, 128), (64, 64), (64, 128)]  # (rows, width): what bench_conv.py tries
# What TritonConv3d runs, the fastest strips at 256×256×160 (H200, session 9, bf16): the forward and input
# gradient sweep 32 rows of 64-wide strips (16→16 1.16 ms, cuDNN 2.76; 2→16 0.46, cuDNN 3.11)
FORWARD = {"rows": 32, "block_w": 64}


def weight_grad_strip(cin: int) -> dict:
    """The weight gradient's strips (with ``WEIGHT_GRAD = "triton"``): 32 rows, 128 wide at ≤ 4 input
    channels (2→16: 0.78 ms; 64-wide 1.10, cuDNN 1.94), 64 wide above (16→16: 1.39 ms; 128-wide 1.46,
    cuDNN 2.08); session 9, H200."""
    return {"rows": 32, "block_w": 128 if cin <= 4 else 64}


WEIGHT_GRAD = "triton"  # or "aten" (cuDNN): which computes TritonConv3d's weight gradient


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def _stages(stage_bytes: int, device: torch.device, fixed: int = 0) -> int:
    """Software-pipeline stages for a loop that loads ``stage_bytes`` per iteration: up to 3, within 85 % of
    the device's shared memory per block less ``fixed`` bytes held throughout (an H200 has 227 KB, an A100
    164 KB: on the H200 2 stages of a 128-wide, 128-K strip did not fit beside its 9 weight taps). Off CUDA
    (Triton's interpreter) the count is not used."""
    smem = 100_000
    if device.type == "cuda":
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", smem)
    return max(1, min(3, (int(0.85 * smem) - fixed) // stage_bytes))


def fold_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_out, C_in, 3, 3, 3) → (9, K, C_out') with row ``kw · C_in + c`` of tap ``kd · 3 + kh`` holding
    ``weight[:, c, kd, kh, kw]``; K and C_out' padded with zeros to powers of two ≥ 16 (tensor-core
    shapes). The bias is padded alike."""
    cout, cin = weight.shape[:2]
    k, coutp = _pow2(3 * cin), _pow2(cout)
    w = weight.permute(2, 3, 4, 1, 0).reshape(9, 3 * cin, cout)  # (kd·3+kh, kw·C_in+c, o)
    w = F.pad(w, (0, coutp - cout, 0, k - 3 * cin)).contiguous()
    b = bias if bias is not None else weight.new_zeros(cout)
    return w, F.pad(b, (0, coutp - cout)).contiguous()


def conv3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 32,
              block_w: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for a channels-last 5-D ``x``, through the Triton kernel
    (one program per ``block_w``-wide strip of ``rows`` rows of an output plane, swept row by row); the
    output is channels-last in ``x``'s dtype."""
    N, cin, D, H, W = x.shape
    cout = weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last_3d)
    wk, bk = fold_weight(weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    k, coutp = wk.shape[1:]
    y = torch.empty((N, coutp, D, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
    from . import triton_kernels  # on first use: importing medgen never needs Triton

    stages = _stages(3 * block_w * k * x.element_size(), x.device, fixed=wk.numel() * wk.element_size())
    triton_kernels.forward[(N * D, -(-H // rows), -(-W // block_w))](
        x, wk, bk, y, D, H, W, CIN=cin, COUT=coutp, K=k, ROWS=rows, BLOCK_W=block_w, num_warps=num_warps,
        num_stages=stages)
    return y[:, :cout] if coutp != cout else y


def conv3x3x3_weight_grad(x: torch.Tensor, grad: torch.Tensor, rows: int = 32, block_w: int = 64,
                          programs: int = 264, num_warps: int = 4) -> torch.Tensor:
    """The weight gradient of ``F.conv3d(x, w, padding=1)`` (3×3×3) for the output gradient ``grad``, in
    float32: ``programs`` programs each sweep a share of the ``rows``-row, ``block_w``-wide strips for all
    nine taps, reading each input row 3 times. Partial sums go into one buffer atomically (so the
    summation order, hence the last bits, vary from run to run)."""
    N, cin, D, H, W = x.shape
    cout = grad.shape[1]
    x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)
    k, coutp = _pow2(3 * cin), _pow2(cout)
    buf = torch.zeros((9, k, coutp), device=x.device, dtype=torch.float32)
    bands, tiles_w = -(-H // rows), -(-W // block_w)
    strips = N * D * bands * tiles_w
    from . import triton_kernels

    stages = _stages((3 * k + coutp) * block_w * x.element_size(), x.device)
    triton_kernels.weight_grad[(min(programs, strips),)](
        x, grad, buf, D, H, W, bands, tiles_w, strips, CIN=cin, CG=cout, COUT=coutp, K=k, ROWS=rows,
        BLOCK_W=block_w, num_warps=num_warps, num_stages=stages)
    # buf[kd·3 + kh, kw·C_in + c, o] → (C_out, C_in, kd, kh, kw)
    return buf[:, :3 * cin, :cout].reshape(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2).contiguous()


class TritonConv3d(nn.Conv3d):
    """``nn.Conv3d`` (3×3×3, stride 1, padding 1, zeros) whose CUDA forward runs :func:`conv3x3x3` (and
    whose input gradient runs it again, on the flipped weights); CPU tensors run the ordinary convolution.
    Same parameters. Under CUDA autocast the inputs are cast as autocast casts a convolution's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or x.ndim != 5:
            return super().forward(x)
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled("cuda"):  # a custom op is not on autocast's lists: cast like conv3d
            dt = torch.get_autocast_dtype("cuda")
            x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
        return torch.ops.medgen.conv3x3x3(x, w, b)


def swap_triton_convs(module: nn.Module, max_channels: int = 16) -> nn.Module:
    """Swap, in place, every 3×3×3 / stride 1 / padding 1 ``nn.Conv3d`` with at most ``max_channels``
    input and output channels for :class:`TritonConv3d` (the full-resolution ones in medgen's 3D UNets).
    16 by measurement (H200, 256×256×160, bf16): ours beats cuDNN at 2→16 (0.46 against 3.1 ms) and
    16→16 (1.16 against 2.76 ms) but loses at 32→16 (2.77 against 2.63 ms), and swapping those too made the
    256³ evaluation slower (35.5 → 42.9 ms); NOTES.md, sessions 8–9."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d) and m.groups == 1 and m.padding_mode == "zeros" \
                and m.kernel_size == (3, 3, 3) and m.stride == (1, 1, 1) and m.padding == (1, 1, 1) \
                and m.dilation == (1, 1, 1) and m.in_channels <= max_channels and m.out_channels <= max_channels:
            m.__class__ = TritonConv3d
    return module


@torch.library.custom_op("medgen::conv3x3x3", mutates_args=())
def _conv3x3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # An opaque op to torch.compile (the kernel launch is captured into the fast path's CUDA graph as is)
    return conv3x3x3(x, weight, bias, **FORWARD).contiguous(memory_format=torch.channels_last_3d)


@_conv3x3x3_op.register_fake
def _(x, weight, bias):
    N, _, D, H, W = x.shape
    return x.new_empty((N, weight.shape[0], D, H, W)).contiguous(memory_format=torch.channels_last_3d)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Input gradient: the same kernel on the output gradient with the weights' channels swapped and taps
    flipped (a stride-1, padding-1 3×3×3 convolution's transpose is one). Weight gradient: the tap-wise
    sums of :func:`conv3x3x3_weight_grad` (``WEIGHT_GRAD = "triton"``) or ATen's convolution backward
    (``"aten"``: cuDNN); bias gradient: a sum."""
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    gx = torch.ops.medgen.conv3x3x3(grad, weight.transpose(0, 1).flip(2, 3, 4), None) if need_x else None
    gw = gb = None
    if need_w and WEIGHT_GRAD == "triton":
        gw = torch.ops.medgen.conv3x3x3_weight_grad(x, grad).to(weight.dtype)
    elif need_w:
        gw = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
                                                 [0, 0, 0], 1, [False, True, False])[1]
    if need_b and ctx.has_bias:
        gb = grad.sum((0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
    return gx, gw, gb


@torch.library.custom_op("medgen::conv3x3x3_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return conv3x3x3_weight_grad(x, grad, **weight_grad_strip(x.shape[1]))


@_weight_grad_op.register_fake
def _(x, grad):
    return x.new_empty((grad.shape[1], x.shape[1], 3, 3, 3), dtype=torch.float32)


_conv3x3x3_op.register_autograd(_backward, setup_context=_setup_context)
