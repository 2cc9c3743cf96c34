"""Which execution path makes the reference UNet fast: layouts, weight dtype, torch.compile, CUDA graphs.

Prints one JSON line per (preset, variant): seconds per network evaluation (no grad) and per
training step (forward, backward, clipping, AdamW), peak memory, compile seconds, and the largest
difference from the eager fp32 output (relative to its scale) so a fast path that is wrong shows.

    python benchmarks/bench_fastpath.py [--presets 3d-pixel-256 3d-pixel-128 2d-pixel-128]
        [--variants eager-autocast cl-autocast bf16w cl-bf16w compile-cl-bf16w graph-cl-bf16w ...]
        [--train] [--budget 540]

Variants (eval): eager-autocast (fp32 weights, bf16 autocast: what the trainer does today),
cl-autocast (channels-last), bf16w (bf16 weights, no autocast), cl-bf16w, compile-autocast,
compile-cl-autocast, compile-cl-bf16w, graph-cl-bf16w (compiled + CUDA graph replay, the sampling
path). With --train the same layouts are timed for a training step (autocast, fp32 master weights).
Stops starting new variants after --budget seconds so one device call stays under its limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

T0 = time.perf_counter()


def sync_time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def build(name: str, dev):
    from medgen_cli.config import load
    from medgen_cli.jobs import build as b

    preset = load(name, ["model.gradient_checkpointing=false"]).preset
    net = b.build_model(preset).to(dev)
    for p in (net.out.parameters() if hasattr(net, "out") else ()):  # MONAI zero-initialises the output conv: the error column needs a signal
        torch.nn.init.normal_(p, std=0.02)
    d = preset.data
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    bsz = preset.train.batch_size
    x = torch.randn(bsz, net_in_channels(net), *spatial, device=dev)
    t = torch.full((bsz,), 500.0, device=dev)
    return preset, net, x, t


def net_in_channels(net) -> int:
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            return m.in_channels
    raise RuntimeError("no conv")


def layout(x, cl: bool):
    if not cl:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


def eval_variant(net, x, t, variant: str, ref: torch.Tensor | None):
    import copy

    cl = "cl" in variant.split("-")
    bf16w = variant.endswith("bf16w")
    m = copy.deepcopy(net).eval()
    if bf16w:
        m = m.to(torch.bfloat16)
    if cl:
        m = m.to(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    xin = layout(x.to(torch.bfloat16) if bf16w else x, cl)
    fn = m
    compile_s = 0.0
    if variant.startswith(("compile", "graph")):
        fn = torch.compile(m, mode="max-autotune-no-cudagraphs" if "autotune" in variant else None,
                           dynamic=False)

    @torch.no_grad()
    def run():
        if bf16w:
            return fn(xin, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(xin, t)

    if variant.startswith(("compile", "graph")):
        c0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - c0
    call = run
    if variant.startswith("graph"):
        static_x = xin.clone()
        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(static_x, t) if bf16w else run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                if bf16w:
                    static_y = fn(static_x, t)
                else:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        static_y = fn(static_x, t)

        def call():
            g.replay()
            return static_y

    torch.cuda.reset_peak_memory_stats()
    s = sync_time(call, 10 if x.shape[-1] <= 128 else 5)
    y = call().float()
    err = None if ref is None else float((y - ref).abs().max() / ref.abs().max())
    return {"eval_s": s, "compile_s": compile_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_rel_err_vs_fp32": err}


def train_variant(net, x, t, variant: str):
    import copy

    cl = "cl" in variant.split("-")
    m = copy.deepcopy(net).train()
    if cl:
        m = m.to(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    xin = layout(x, cl)
    target = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device)
    fn = torch.compile(m) if variant.startswith("compile") else m
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = fn(xin, t)
        loss = torch.nn.functional.mse_loss(v.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    c0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - c0
    torch.cuda.reset_peak_memory_stats()
    s = sync_time(step, 5)
    return {"step_s": s, "first_step_s": compile_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["3d-pixel-256", "3d-pixel-128", "2d-pixel-128"])
    ap.add_argument("--variants", nargs="+", default=["eager-autocast", "cl-autocast", "bf16w", "cl-bf16w",
                                                      "compile-autocast", "compile-cl-bf16w", "graph-cl-bf16w"])
    ap.add_argument("--train", nargs="*", default=[], help="training variants: eager, cl, compile, compile-cl")
    ap.add_argument("--budget", type=float, default=540.0)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    for name in args.presets:
        preset, net, x, t = build(name, dev)
        with torch.no_grad():
            ref = net.eval()(x, t).float()
        for v in args.variants:
            if time.perf_counter() - T0 > args.budget:
                print(json.dumps({"preset": name, "variant": v, "skipped": "budget"}), flush=True)
                continue
            try:
                r = eval_variant(net, x, t, v, ref)
            except Exception as e:  # noqa: BLE001 — a benchmark reports and goes on
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps({"preset": name, "variant": v, "batch": x.shape[0], **r}), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        for v in args.train:
            if time.perf_counter() - T0 > args.budget:
                print(json.dumps({"preset": name, "train": v, "skipped": "budget"}), flush=True)
                continue
            try:
                r = train_variant(net, x, t, v)
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps({"preset": name, "train": v, "batch": x.shape[0], **r}), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        del net, x, ref
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
