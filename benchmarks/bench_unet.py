"""Training step, one network evaluation and a 25-step sample: medgen beside a plain MONAI loop.

Prints one JSON object per preset: seconds per training step (forward, backward, clipping,
optimizer, EMA when on), seconds per network evaluation (bf16, no grad), peak GPU memory, and the
ratio plain/medgen (> 1 means medgen is faster). Needs a CUDA GPU.

    python benchmarks/bench_unet.py [--presets 3d-pixel-128 3d-pixel-256 2d-pixel-128 2d-pixel-256] [--iters 10]
        [--compile] [--budget 520] [--variants medgen plain ...]

With --compile it adds medgen compiled (train.compile: channels-last, torch.compile, fused AdamW; and
again with train.compile_mode="reduce-overhead": each step replayed from CUDA graphs),
the sampling fast path (engine/fastpath.py: bf16 weights, channels-last, compile, CUDA graphs) and
the plain loop under torch.compile, all in the same run.

Batch size is the preset's (1 in 3D, 16 in 2D); 2D figures are also given as images/s.

The plain loop is what a researcher writes from the MONAI tutorials: DiffusionModelUNet, AdamW,
RFlowScheduler.add_noise, bf16 autocast, fp32 MSE, clip_grad_norm_. Both build the same UNet.
medgen runs as its preset says (gradient checkpointing on for the 3D presets, as the reference);
`medgen-nockpt` is the same step with checkpointing off.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

T0 = time.perf_counter()

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def peak(fn) -> float:
    """GiB allocated at most during one ``fn()``, counted from a reset after the warm-up. A step replayed
    from CUDA graphs allocates nothing while it runs (its activations live in the graphs' private pool),
    so for ``medgen-graphs`` this is the resident state only; ``*_reserved_gib`` holds the pool too."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    cuda_free()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def batch_for(preset, dev):
    d = preset.data
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    shape = (preset.train.batch_size, 1, *spatial)
    image = torch.rand(shape, device=dev)
    cond = (torch.rand(shape, device=dev) > 0.99).float()
    return image, cond


class Synthetic(torch.utils.data.Dataset):
    """Stands in for the dataset: ``n`` copies of the first item of ``image``/``cond`` (the trainer's
    step, validation and preview read only shapes)."""

    def __init__(self, image, cond, n: int = 1):
        self.item, self.n = {"image": image[0].cpu(), "cond": cond[0].cpu()}, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item


def medgen_step(preset, dev, image, cond):
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build

    ds = Synthetic(image, cond)
    tr = Trainer(build.build_model(preset), build.build_strategy(preset), ds, ds, preset.train,
                 "/tmp/medgen-bench-run", "{}", dev, space=build.build_space(preset, ds))
    # No host sync per step: like the plain loop below, and like `medgen train`, which reads the loss
    # every `log_every` steps (`timed` syncs once at the end of its steps).
    return tr, lambda: tr._step(image, cond)


def plain_step(preset, dev, image, cond, compiled: bool = False, sdpa: bool = False):
    """MONAI's UNet as the preset builds it, with MONAI's default attention (``sdpa``: its
    ``use_flash_attention``, what a researcher turns on when the default runs out of memory)."""
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import RFlowScheduler

    m = preset.model
    net = DiffusionModelUNet(spatial_dims=preset.data.dims, in_channels=2, out_channels=1, channels=m.channels,
                             attention_levels=m.attention_levels, num_res_blocks=m.num_res_blocks,
                             num_head_channels=m.num_head_channels, norm_num_groups=m.norm_num_groups,
                             use_flash_attention=sdpa).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    fwd = torch.compile(net) if compiled else net
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="logit-normal")

    def step():
        noise = torch.randn_like(image)
        t = sched.sample_timesteps(image)
        x_t = sched.add_noise(image, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            v = fwd(torch.cat([x_t, cond], 1), t)
        loss = torch.nn.functional.mse_loss(v.float(), (image - noise).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd, step


def evaluation(net, dev, image, cond):
    x = torch.cat([image, cond], 1)
    t = torch.full((image.shape[0],), 500.0, device=dev)

    @torch.no_grad()
    def run():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            net(x, t)

    return run


def sample25(tr, dev, image, cond):
    """A 25-step Euler sample of the whole batch through medgen's generate()."""
    from medgen_cli.engine.sampling import generate
    from medgen_cli.runtime import autocast

    noise = torch.randn_like(image)
    return lambda: generate(tr.model.eval(), tr.strategy, noise, cond, "euler", 25, autocast(dev, "bf16"))


def plain_sample25(net, dev, image, cond):
    """The plain 25-step Euler loop a researcher writes around the (possibly compiled) network."""
    noise = torch.randn_like(image)
    ts = torch.linspace(1.0, 0.0, 26, device=dev)

    @torch.no_grad()
    def run():
        x = noise
        for k in range(25):
            t = torch.full((x.shape[0],), float(ts[k]) * 1000.0, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                v = net(torch.cat([x, cond], 1), t)
            x = x + (ts[k] - ts[k + 1]) * v.float()
        return x

    return run


VARIANTS = ["medgen", "medgen-nockpt", "medgen-compiled", "medgen-graphs", "plain", "plain-compiled"]


def over_budget(args) -> bool:
    return time.perf_counter() - T0 > args.budget


def run_plain(out: dict, args, preset, dev, image, cond, sdpa: bool) -> None:
    """The plain loop's figures into ``out`` (eager, then compiled if asked)."""
    if sdpa:
        out["plain_attention"] = "sdpa (use_flash_attention=True)"
    if "plain" in args.variants:
        net, step = plain_step(preset, dev, image, cond, sdpa=sdpa)
        out["plain_step_s"] = timed(step, args.iters)
        out["plain_peak_gib"] = peak(step)
        out["plain_eval_s"] = timed(evaluation(net.eval(), dev, image, cond), args.iters)
        out["plain_sample25_s"] = timed(plain_sample25(net, dev, image, cond), 2, warmup=1)
        del net, step
        print("partial", json.dumps(out), file=sys.stderr, flush=True)
    if args.compile and "plain-compiled" in args.variants and not over_budget(args):
        cnet, cstep = plain_step(preset, dev, image, cond, compiled=True, sdpa=sdpa)
        t0 = time.perf_counter()
        cstep()
        sync()
        out["plain-compiled_first_step_s"] = time.perf_counter() - t0
        out["plain-compiled_step_s"] = timed(cstep, args.iters)
        out["plain-compiled_peak_gib"] = peak(cstep)
        cnet.eval()
        out["plain-compiled_eval_s"] = timed(evaluation(cnet, dev, image, cond), args.iters)
        out["plain-compiled_sample25_s"] = timed(plain_sample25(cnet, dev, image, cond), 2, warmup=1)


def bench(name: str, args) -> dict:
    from medgen_cli.config import load
    from medgen_cli.engine.fastpath import FastNet

    iters = args.iters
    dev = torch.device(args.device)
    out = {"preset": name, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__}
    variants = [("medgen", None), ("medgen-nockpt", ["model.gradient_checkpointing=false"])]
    if args.compile:
        variants.append(("medgen-compiled", ["model.gradient_checkpointing=false", "train.compile=true"]))
        variants.append(("medgen-graphs", ["model.gradient_checkpointing=false", "train.compile=true",
                                           'train.compile_mode="reduce-overhead"']))
    variants = [v for v in variants if v[0] in args.variants]
    for label, sets in variants:
        if over_budget(args):
            out[f"{label}"] = "skipped: time budget"
            continue
        preset = load(name, sets or []).preset
        image, cond = batch_for(preset, dev)
        tr, step = medgen_step(preset, dev, image, cond)
        t0 = time.perf_counter()
        step()
        sync()
        out[f"{label}_first_step_s"] = time.perf_counter() - t0
        out[f"{label}_step_s"] = timed(step, iters)
        out[f"{label}_peak_gib"] = peak(step)
        if dev.type == "cuda":
            out[f"{label}_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
        if sets is None:
            out["medgen_eval_s"] = timed(evaluation(tr.model.eval(), dev, image, cond), iters)
            out["medgen_sample25_s"] = timed(sample25(tr, dev, image, cond), 2, warmup=1)
        if label == "medgen-compiled":  # the sampling fast path on the same weights
            fast = FastNet(tr.model.eval(), dev)
            x = torch.cat([image, cond], 1)
            t = torch.full((image.shape[0],), 500.0, device=dev)
            t0 = time.perf_counter()
            fast(x, t)
            sync()
            out["medgen_fast_compile_s"] = time.perf_counter() - t0
            out["medgen_fast_eval_s"] = timed(lambda: fast(x, t), iters)
            tr_fast = type("T", (), {"model": fast, "strategy": tr.strategy})
            out["medgen_fast_sample25_s"] = timed(sample25(tr_fast, dev, image, cond), 3, warmup=1)
            del fast, tr_fast
        del tr, step
        print("partial", json.dumps(out), file=sys.stderr, flush=True)  # kept if a time limit kills the run
        gc.collect()
        cuda_free()
        torch._dynamo.reset()
    preset = load(name).preset
    image, cond = batch_for(preset, dev)
    for sdpa in (False, True):  # MONAI's default attention first; SDPA only if that runs out of memory
        try:
            run_plain(out, args, preset, dev, image, cond, sdpa)
            break
        except torch.OutOfMemoryError:
            for k in [k for k in out if k.startswith("plain")]:  # a half-measured attempt's figures
                del out[k]
            out["plain"] = "out of memory" + (" with SDPA attention too" if sdpa else " with MONAI's default attention")
        finally:
            gc.collect()
            cuda_free()
            torch._dynamo.reset()
    for a, b in (("plain_step_s", "medgen_step_s"), ("plain_step_s", "medgen-nockpt_step_s"),
                 ("plain_eval_s", "medgen_eval_s"), ("plain_step_s", "medgen-compiled_step_s"),
                 ("plain-compiled_step_s", "medgen-compiled_step_s"), ("plain-compiled_step_s", "medgen-graphs_step_s"),
                 ("plain_eval_s", "medgen_fast_eval_s"),
                 ("plain-compiled_eval_s", "medgen_fast_eval_s"), ("plain_sample25_s", "medgen_fast_sample25_s"),
                 ("plain-compiled_sample25_s", "medgen_fast_sample25_s")):
        if isinstance(out.get(a), float) and isinstance(out.get(b), float):
            out[f"ratio_{a.removesuffix('_s')}/{b.removesuffix('_s')}"] = out[a] / out[b]
    if preset.data.dims == 2:
        bsz = preset.train.batch_size
        for k in ("medgen-nockpt", "medgen-compiled", "medgen-graphs", "plain", "plain-compiled"):
            if isinstance(out.get(f"{k}_step_s"), float):
                out[f"{k}_train_img_s"] = bsz / out[f"{k}_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["3d-pixel-128", "3d-pixel-256", "2d-pixel-128", "2d-pixel-256"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="add the compiled variants (minutes of compiling)")
    ap.add_argument("--device", default="cuda", help="cuda (figures) or cpu (a smoke run of small presets)")
    ap.add_argument("--budget", type=float, default=520.0, help="seconds after which no new variant starts")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                    help="run only these (a 3D preset's compiled variants take minutes each: split them "
                         "over calls, e.g. --variants medgen-graphs plain-compiled)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu with a small preset)")
    torch.backends.cudnn.benchmark = True
    for name in args.presets:
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()
