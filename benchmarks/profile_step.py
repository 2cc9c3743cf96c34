"""Where a training step or one sampling evaluation spends its time on the GPU (torch.profiler).

    python benchmarks/profile_step.py --preset 2d-pixel-128 --what train [--set train.compile=true ...]
    python benchmarks/profile_step.py --preset 3d-pixel-256 --what fast-eval [--plain-ops | --native-group-norm]
        [--cudnn-convs | --conv-strip 32x128 | --triton-channels 32 | --autotune-convs] [--copies]

Prints one JSON object: wall seconds per step, GPU busy seconds per step (sum of kernel times), kernel
launches per step, and the kernels that take the most GPU time, grouped by kind (convolution, GEMM,
normalisation, elementwise/fused Triton, copies). Busy ≪ wall means the host (launches, syncs) is the
bound; busy ≈ wall means the kernels are, and the table says which.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_unet  # noqa: E402

# first match wins: attention before conv (cuDNN's attention kernels are named cudnn_…_sdpa_…_flash_…)
KINDS = [("comm", r"nccl"), ("attention", r"flash|fmha|attention|sdpa"),
         ("conv", r"conv|implicit_gemm|sm90_xmma_fprop|dgrad|wgrad|cudnn"), ("gemm", r"gemm|matmul|cutlass|nvjet"),
         ("norm", r"norm|welford"), ("triton", r"^triton_"),
         ("copy", r"copy|memcpy|memset|cat|transpose|permute"), ("optimizer", r"adam|foreach|multi_tensor|lerp")]


def kind(name: str) -> str:
    low = name.lower()
    for k, pat in KINDS:
        if re.search(pat, low):
            return k
    return "other"


def copy_origins(p, steps: int) -> list:
    """Which CPU op launched each copy kernel, with its input shapes, the ops that called it (``callers``:
    e.g. aten::contiguous < aten::cudnn_convolution_backward) and the compiled graph or autograd node it
    ran in (visible only without CUDA graphs: a graph replay hides its ops)."""
    found: dict = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        for k in getattr(e, "kernels", []):
            if kind(k.name) != "copy":
                continue
            callers, chain, a = [], [], e.cpu_parent
            while a is not None:
                if re.search(r"Compiled|Backward|Optimizer|autograd|clip|ema|##", a.name):
                    chain.append(a.name[:60])
                elif len(callers) < 3:
                    callers.append(a.name[:60])
                a = a.cpu_parent
            key = (e.name, str(e.input_shapes)[:120], " < ".join(callers), " < ".join(chain[:3]))
            found[key][0] += k.duration / 1e6 / steps
            found[key][1] += 1
    return [{"op": op, "shapes": sh, "callers": c, "within": w, "s": round(v[0], 5), "calls": v[1] // steps}
            for (op, sh, c, w), v in sorted(found.items(), key=lambda kv: -kv[1][0])[:25]]


def profile(fn, steps: int, copies: bool = False, top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    wall = bench_unet.timed(fn, steps)  # 3 warm-up calls, then the mean of `steps`
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=copies) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict = defaultdict(lambda: [0.0, 0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time_total / 1e6 / steps
            per_kernel[e.name][1] += 1
    busy = sum(v[0] for v in per_kernel.values())
    by_kind: dict = defaultdict(float)
    for name, (sec, _) in per_kernel.items():
        by_kind[kind(name)] += sec
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_s": round(wall, 5), "gpu_busy_s": round(busy, 5), "busy_share": round(busy / wall, 3),
            "launches_per_step": sum(v[1] for v in per_kernel.values()) // steps,
            "by_kind_s": {k: round(v, 5) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:110], "s": round(v[0], 5), "calls": v[1] // steps} for n, v in ranked],
            **({"copy_origins": copy_origins(p, steps)} if copies else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--what", choices=["train", "fast-eval", "eval"], default="train")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--copies", action="store_true", help="say which ops launch the copy kernels")
    ap.add_argument("--top", type=int, default=25, help="how many of the costliest kernels to list")
    ap.add_argument("--plain-ops", action="store_true",
                    help="keep MONAI's modules (no engine.fastpath.exact_fast_ops), for comparison")
    ap.add_argument("--native-group-norm", action="store_true",
                    help="keep MONAI's GroupNorm, swap the rest (exact_fast_ops(group_norm=False)), for comparison")
    ap.add_argument("--autotune-convs", action="store_true",
                    help="fast-eval: FastNet(autotune_convs=True), Inductor's Triton conv templates against cuDNN")
    ap.add_argument("--cudnn-convs", action="store_true",
                    help="exact_fast_ops(triton_convs=False): cuDNN for the small 3×3×3 convs, for comparison")
    ap.add_argument("--aten-weight-grad", action="store_true",
                    help="our Triton convs with the weight gradient on cuDNN instead of our kernel")
    ap.add_argument("--conv-strip", default="", metavar="ROWSxW",
                    help="our Triton convs (forward, input and weight gradients) on one strip size instead of "
                         "the defaults, e.g. 32x128")
    ap.add_argument("--triton-channels", type=int, default=None, metavar="N",
                    help="swap in our Triton convs up to N channels instead of swap_triton_convs' default")
    a = ap.parse_args()
    import medgen_cli.engine.fastpath as fastpath

    if a.plain_ops:
        fastpath.exact_fast_ops = lambda module, **_: module
    elif a.native_group_norm or a.cudnn_convs:
        fastpath.exact_fast_ops = functools.partial(fastpath.exact_fast_ops, group_norm=not a.native_group_norm,
                                                    triton_convs=False if a.cudnn_convs else None)
    import medgen_cli.engine.triton_conv as triton_conv

    if a.aten_weight_grad:
        triton_conv.WEIGHT_GRAD = "aten"
    if a.conv_strip:
        rows, width = map(int, a.conv_strip.split("x"))
        triton_conv.FORWARD = {"rows": rows, "block_w": width}
        triton_conv.weight_grad_strip = lambda cin: triton_conv.FORWARD
    if a.triton_channels:
        triton_conv.swap_triton_convs = functools.partial(triton_conv.swap_triton_convs, max_channels=a.triton_channels)
    from medgen_cli.config import load

    dev = torch.device("cuda")
    preset = load(a.preset, a.set).preset
    image, cond = bench_unet.batch_for(preset, dev)
    tr, step = bench_unet.medgen_step(preset, dev, image, cond)
    out = {"preset": a.preset, "what": a.what, "set": a.set, "plain_ops": a.plain_ops,
           "native_group_norm": a.native_group_norm, "autotune_convs": a.autotune_convs,
           "cudnn_convs": a.cudnn_convs, "aten_weight_grad": a.aten_weight_grad,
           "conv_strip": a.conv_strip, "triton_channels": a.triton_channels,
           "batch": preset.train.batch_size, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    if a.what == "train":
        fn = step
        fn()
    else:
        x = torch.cat([image, cond], 1)
        tt = torch.full((image.shape[0],), 500.0, device=dev)
        if a.what == "fast-eval":
            from medgen_cli.engine.fastpath import FastNet

            net = FastNet(tr.model.eval(), dev, autotune_convs=a.autotune_convs)
            fn = lambda: net(x, tt)  # noqa: E731
        else:
            ev = bench_unet.evaluation(tr.model.eval(), dev, image, cond)
            fn = ev
        fn()
    torch.cuda.synchronize()
    out["first_call_s"] = round(time.perf_counter() - t, 2)
    out.update(profile(fn, a.steps, a.copies, a.top))
    out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # since process start
    out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
