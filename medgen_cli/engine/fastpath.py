"""The sampling fast path: bf16 weights, channels-last, ``torch.compile`` and CUDA-graph replay.

``medgen sample --compile`` (``sample.compile``) wraps the network in :class:`FastNet`. Measured on one
H200 (benchmarks/NOTES.md, ``benchmarks/bench_fastpath.py``), one evaluation of the 270M 3D UNet at
256×256×160 takes 0.195 s eager under bf16 autocast, 0.057 s compiled, 0.045 s compiled with bf16
weights in channels-last layout, 0.044 s replayed from a CUDA graph and 0.038 s with the small 3×3×3
convolutions on engine/triton_conv.py's kernels; the 2D 128² UNet at batch 16 0.020 → 0.008 s.

What changes and what does not:
- modules that cuDNN or Inductor run slowly are swapped for exact equivalents (:func:`exact_fast_ops`);
- weights are cast once to bf16 (autocast is switched off inside: there is nothing left to cast) and
  convolution weights, inputs and activations use the channels-last layout (NHWC / NDHWC);
- the compiled network is captured once per input signature (shapes and dtypes of every tensor
  argument) into a CUDA graph; a call copies its inputs into the graph's static buffers, replays it
  and returns a float32, channel-first copy of the output, so the caller sees an ordinary tensor;
- results equal the eager fp32 network within bf16 rounding (tests/test_fastpath.py on the CPU
  without compile; ``-m gpu`` with compile and graphs).

Off CUDA the wrapper only compiles (fp32, no graphs): bf16 convolutions are slow on CPUs. A network
whose forward cannot be captured (a host sync, data-dependent control flow) falls back to the
compiled call with a warning, as does an input signature beyond ``max_graphs``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os

import torch
from torch import nn

from ..runtime import persistent_compile_cache

log = logging.getLogger("medgen")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC / NDHWC for 4-D / 5-D tensors; anything else unchanged."""
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """``x``'s memory format: channels-last where ``x`` is that and not also plainly contiguous."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return cl if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl) \
        else torch.contiguous_format


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convolution weights of ``module`` in channels-last layout, in place (2D and 3D)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.ndim in (4, 5):
                p.data = channels_last(p.data)
    return module


class _DepthFoldConv3d(nn.Conv3d):
    """A 3×3×3 convolution (stride 1, padding 1) with few input channels, run as one 2D convolution.

    cuDNN has no tensor-core kernel for 3D inputs of under 8 channels (the UNet's 2-channel ``conv_in``
    falls back to a generic one). Stacking each slice's depth neighbours as channels, (B·D, 3C, H, W)
    against the weight reshaped to (C_out, 3C, 3, 3), computes the same sums in another order: forward
    and backward 2.9 → 2.0 ms and 7.6 → 4.8 ms at 256×256×160 (`benchmarks/bench_conv.py`, H200).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, D, H, W = x.shape
        xl = nn.functional.pad(x.permute(0, 2, 3, 4, 1), (0, 0, 0, 0, 0, 0, 1, 1))  # (B, D+2, H, W, C)
        stacked = torch.cat([xl[:, 0:D], xl[:, 1:D + 1], xl[:, 2:D + 2]], dim=-1)  # (B, D, H, W, 3C)
        w = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, 3 * C, 3, 3)
        y = nn.functional.conv2d(stacked.reshape(B * D, H, W, 3 * C).permute(0, 3, 1, 2),
                                 channels_last(w), self.bias, padding=1)  # (B·D, C_out, H, W)
        return y.reshape(B, D, self.out_channels, H, W).permute(0, 2, 1, 3, 4)


class _PaddedOutConv3d(nn.Conv3d):
    """A 3D convolution with under 8 output channels, run with zero filters up to 8 and sliced back.

    Exact (the added filters are zeros); cuDNN then picks a tensor-core kernel: the UNet's 16 → 1
    output convolution forward and backward 8.7 → 7.1 ms at 256×256×160.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.out_channels
        w = torch.cat([self.weight, self.weight.new_zeros(8 - n, *self.weight.shape[1:])])
        b = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(8 - n)])
        return self._conv_forward(x, channels_last(w), b)[:, :n]


class _RepeatUpsample(nn.Upsample):
    """Nearest upsampling by an integer factor as broadcast + reshape.

    Same values as ``F.interpolate(mode="nearest")``; its backward is a sum over the repeats, which
    Inductor fuses, instead of the scatter-add of ``interpolate``'s backward (1 ms at full resolution in
    the 3d-pixel-128 training step; the compiled 2d-pixel-128 step's GPU time 38.0 → 36.7 ms). A
    channels-last input gives a channels-last output (a reshape of the broadcast would be channel-first).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sf = self.scale_factor
        factors = sf if isinstance(sf, tuple) else (sf,) * (x.ndim - 2)
        last = memory_format(x) is not torch.contiguous_format  # channels-last in, channels-last out
        y = x.movedim(1, -1) if last else x  # (B, *S, C) or (B, C, *S)
        lead, tail = (list(y.shape[:1]), list(y.shape[-1:])) if last else (list(y.shape[:2]), [])
        view, big, out = list(lead), list(lead), list(lead)
        for s, f in zip(x.shape[2:], factors):
            view += [s, 1]
            big += [s, int(f)]
            out.append(s * int(f))
        y = y.reshape(view + tail).expand(big + tail).reshape(out + tail)
        return y.movedim(-1, 1) if last else y


class _CatDenseGrads(torch.autograd.Function):
    """``torch.cat((a, b), dim=1)`` whose backward hands each input a dense gradient in that input's layout.

    The plain backward gives channel slices of the concatenated gradient; a slice of a channels-last
    tensor is not dense, and cuDNN's convolution backward copies it (the decoder's skip connections).
    Two named inputs, not ``*xs``: Dynamo (torch 2.11–2.14) binds a variadic ``forward`` wrongly when no input
    requires grad — compiled sampling got only the last input (tests/test_fastpath.py)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.sizes = [a.shape[1], b.shape[1]]
        ctx.formats = [memory_format(a), memory_format(b)]
        return torch.cat((a, b), 1)

    @staticmethod
    def backward(ctx, g):
        return tuple(p.contiguous(memory_format=f) for p, f in zip(g.split(ctx.sizes, 1), ctx.formats))


@functools.cache
def _monai_blocks() -> dict:
    """MONAI's UNet blocks → the same blocks without the layout changes of their forwards: the
    ``.contiguous()`` after each attention (it turns channels-last activations back to channel-first, and
    every convolution that meets them copies them again: 30 copies, 2.6 ms, in the compiled 2d-pixel-128
    step; benchmarks/NOTES.md, session 11) and the skip connections' concatenation (:class:`_CatDenseGrads`).
    Same modules, parameters and values."""
    from monai.networks.nets import diffusion_model_unet as d

    def down(self, hidden_states, temb, context=None):
        out = []
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb))
            out.append(hidden_states)
        if self.downsampler is not None:
            hidden_states = self.downsampler(hidden_states, temb)
            out.append(hidden_states)
        return hidden_states, out

    def mid(self, hidden_states, temb, context=None):
        return self.resnet_2(self.attention(self.resnet_1(hidden_states, temb)), temb)

    def up(self, hidden_states, res_hidden_states_list, temb, context=None):
        attns = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for i, (resnet, attn) in enumerate(zip(self.resnets, attns)):
            skip = res_hidden_states_list[-1 - i]
            hidden_states = resnet(_CatDenseGrads.apply(hidden_states, skip), temb)
            if attn is not None:
                hidden_states = attn(hidden_states)
        if self.upsampler is not None:
            hidden_states = self.upsampler(hidden_states, temb)
        return hidden_states

    return {base: type(f"_{base.__name__}", (base,), {"forward": fwd, "__doc__": "MONAI's block, layout kept"})
            for base, fwd in ((d.AttnDownBlock, down), (d.AttnMidBlock, mid), (d.AttnUpBlock, up), (d.UpBlock, up))}


class _ChannelStatsGroupNorm(nn.GroupNorm):
    """GroupNorm from per-channel statistics, so that every op keeps the input's memory layout.

    ``aten.native_group_norm`` declares contiguous outputs whatever its input, and Inductor fixes the
    layout of a tensor that feeds a convolution backward to those declared strides, so cuDNN copies each
    such input back to channels-last (117 copies, 4.3 ms, in the compiled 3D 128 training step;
    benchmarks/NOTES.md, session 6). Here the statistics are reduced per channel over space (a reduction
    along the channels-last tensor's outer dimension) and combined per group exactly (equal counts: the
    group variance is the mean of the channel variances plus the variance of the channel means); the
    normalisation is then one per-channel scale and shift. Statistics in float32; output in float32 under
    CUDA autocast (its policy for GroupNorm), else in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:  # (B, C): no spatial dimensions to reduce per channel
            return super().forward(x)
        B, C, G = x.shape[0], x.shape[1], self.num_groups
        var_c, mean_c = torch.var_mean(x.float(), dim=tuple(range(2, x.ndim)), correction=0)  # (B, C)
        mean_c, var_c = mean_c.view(B, G, C // G), var_c.view(B, G, C // G)
        mean_g = mean_c.mean(2, keepdim=True)
        var_g = var_c.mean(2, keepdim=True) + (mean_c - mean_g).square().mean(2, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps).expand(B, G, C // G).reshape(B, C)
        shift = -mean_g.expand(B, G, C // G).reshape(B, C) * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (B, C) + (1,) * (x.ndim - 2)
        y = torch.addcmul(shift.view(shape), x.float(), scale.view(shape))
        cuda_autocast = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")  # GroupNorm: fp32 policy
        return y if cuda_autocast else y.to(x.dtype)


def triton_convs_default(device: torch.device) -> bool:
    """Whether :func:`exact_fast_ops` runs the small 3×3×3 convolutions of a network on ``device`` with
    our Triton kernel: a CUDA device of compute capability ≥ 8.0 (bf16 tensor-core products: A100,
    H100/H200 and later), Triton installed, and ``MEDGEN_TRITON_CONVS`` not ``0``."""
    return device.type == "cuda" and os.environ.get("MEDGEN_TRITON_CONVS", "1") != "0" \
        and importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def exact_fast_ops(module: nn.Module, group_norm: bool = True, triton_convs: bool | None = None) -> nn.Module:
    """Swap, in place, the modules that cuDNN or Inductor run slowly for exact equivalents.

    3D convolutions with under 8 input channels (3×3×3, stride 1, padding 1) or under 8 output
    channels, nearest upsampling by an integer factor, MONAI's UNet blocks (their forwards without layout
    changes, :func:`_monai_blocks`) and (``group_norm``) GroupNorm: classes above;
    with ``triton_convs`` the 3×3×3 convolutions of ≤ 16 channels run our Triton kernel
    (``engine/triton_conv.py``). ``None`` (the default): :func:`triton_convs_default` for the module's
    device (measured on an H200: 256³ evaluation 44.0 →
    35.5 ms, 3D training steps 147.8 → 134.7 ms at 256 and 44.8 → 41.8 ms at 128; NOTES.md, sessions 8–9).
    Only the classes change: parameters, buffers and state-dict keys stay, so checkpoints are unaffected.
    Used where the network is compiled on a GPU (training with ``train.compile``, the sampling fast path).
    """
    if triton_convs is None:
        p = next(module.parameters(), None)
        triton_convs = p is not None and triton_convs_default(p.device)
    blocks = _monai_blocks()
    for m in module.modules():
        if type(m) is nn.Conv3d and m.groups == 1 and m.padding_mode == "zeros":
            if m.in_channels < 8 and m.kernel_size == (3, 3, 3) and m.stride == (1, 1, 1) \
                    and m.padding == (1, 1, 1) and m.dilation == (1, 1, 1):
                m.__class__ = _DepthFoldConv3d
            elif m.out_channels < 8 and isinstance(m.padding, tuple):
                m.__class__ = _PaddedOutConv3d
        elif type(m) is nn.Upsample and m.mode == "nearest" and m.size is None and m.scale_factor is not None \
                and all(float(f).is_integer() and f >= 1 for f in
                        (m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,))):
            m.__class__ = _RepeatUpsample
        elif group_norm and type(m) is nn.GroupNorm:
            m.__class__ = _ChannelStatsGroupNorm
        elif type(m) in blocks:
            m.__class__ = blocks[type(m)]
    if triton_convs:
        from .triton_conv import swap_triton_convs

        swap_triton_convs(module)
    return module


class FastNet(nn.Module):
    """``net`` behind bf16 weights, channels-last, ``torch.compile`` and CUDA graphs (module docstring).

    Called like ``net``: ``fast(x, t, **tensors)``; returns float32 in the standard layout. ``net`` is
    copied, so the caller's module keeps its fp32 weights.
    """

    def __init__(self, net: nn.Module, device: torch.device, *, compile: bool = True, graphs: bool | None = None,
                 dtype: torch.dtype | None = None, layout: bool | None = None, max_graphs: int = 8,
                 autotune_convs: bool = False):
        super().__init__()
        cuda = torch.device(device).type == "cuda"
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if cuda else torch.float32)
        self.layout = cuda if layout is None else layout
        self.use_graphs = (cuda and compile) if graphs is None else graphs
        self.max_graphs = max_graphs
        inner = copy.deepcopy(net).eval().to(device=device, dtype=self.dtype)
        self.module = to_channels_last(exact_fast_ops(inner)) if self.layout else inner  # "module": as DDP
        if compile:
            persistent_compile_cache()
        # autotune_convs (CUDA): Inductor times its Triton convolution templates against cuDNN, per conv, at
        # the first call (minutes for a 3D UNet; cached). The gemm backends must keep TRITON: Inductor's
        # conv lowering asks use_triton_template, which reads them (restricting them to ATEN tuned no conv
        # at all: session 8). Off: its gain is not yet measured (benchmarks/NOTES.md, session 8).
        options = {"max_autotune": True, "max_autotune_conv_backends": "ATEN,TRITON"} \
            if autotune_convs and cuda else None
        self.fn = torch.compile(self.module, dynamic=False, options=options) if compile else self.module
        self.graphs: dict[tuple, tuple] = {}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs that are images go to the weights' dtype and layout; times stay as they are."""
        if x.ndim < 4:
            return x
        x = x.to(self.dtype)
        return channels_last(x) if self.layout else x

    def _call(self, args: tuple, names: tuple[str, ...]) -> torch.Tensor:
        kw = dict(zip(names, args[2:]))
        with torch.autocast(args[0].device.type, enabled=False):
            return self.fn(args[0], args[1], **kw)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, **tensors) -> torch.Tensor:
        names = tuple(sorted(k for k, v in tensors.items() if v is not None))
        args = tuple(self._prepare(a) for a in (x, t, *(tensors[k] for k in names)))
        key = (names, *((tuple(a.shape), a.dtype) for a in args))
        if self.use_graphs and (key in self.graphs or len(self.graphs) < self.max_graphs):
            entry = self.graphs.get(key) or self._capture(key, args, names)
            if entry is not None:
                graph, static_in, static_out = entry
                for buf, a in zip(static_in, args):
                    buf.copy_(a)
                graph.replay()
                # copy=True: never hand out the static buffer the next replay overwrites (fp32 graphs too)
                return static_out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return self._call(args, names).to(torch.float32, memory_format=torch.contiguous_format)

    def _capture(self, key: tuple, args: tuple, names: tuple[str, ...]):
        """Compile (first call), warm up on a side stream, capture; None (and a warning) if it fails."""
        static_in = tuple(a.clone() for a in args)
        try:
            self._call(static_in, names)  # compiles for this signature
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._call(static_in, names)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._call(static_in, names)
        except Exception as e:  # noqa: BLE001 — capture is an optimisation; the compiled call still works
            log.warning("warning: CUDA-graph capture failed (%s: %s); sampling runs compiled without graphs",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.use_graphs = False
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, static_in, static_out)
        return self.graphs[key]
