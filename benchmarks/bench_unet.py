"""Training step, one network evaluation and a 25-step sample: medgen beside a plain MONAI loop.

Prints one JSON object per preset: seconds per training step (forward, backward, clipping,
optimizer, EMA when on), seconds per network evaluation (bf16, no grad), peak GPU memory, and the
ratio plain/medgen (> 1 means medgen is faster). Needs a CUDA GPU.

    python benchmarks/bench_unet.py [--presets 3d-pixel-128 3d-pixel-256 2d-pixel-128 2d-pixel-256] [--iters 10]

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
import time

import torch


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def peak(fn) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def batch_for(preset, dev):
    d = preset.data
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    shape = (preset.train.batch_size, 1, *spatial)
    image = torch.rand(shape, device=dev)
    cond = (torch.rand(shape, device=dev) > 0.99).float()
    return image, cond


class Synthetic(torch.utils.data.Dataset):
    """Stands in for the dataset: the trainer's step only needs tensors of the right shape."""

    def __init__(self, image, cond):
        self.item = {"image": image[0].cpu(), "cond": cond[0].cpu()}

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.item


def medgen_step(preset, dev, image, cond):
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build

    ds = Synthetic(image, cond)
    tr = Trainer(build.build_model(preset), build.build_strategy(preset), ds, ds, preset.train,
                 "/tmp/medgen-bench-run", "{}", dev)
    return tr, lambda: tr._step(image, cond)["loss"].item()  # sync like a logging step


def plain_step(preset, dev, image, cond):
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import RFlowScheduler

    m = preset.model
    net = DiffusionModelUNet(spatial_dims=preset.data.dims, in_channels=2, out_channels=1, channels=m.channels,
                             attention_levels=m.attention_levels, num_res_blocks=m.num_res_blocks,
                             num_head_channels=m.num_head_channels, norm_num_groups=m.norm_num_groups).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="logit-normal")

    def step():
        noise = torch.randn_like(image)
        t = sched.sample_timesteps(image)
        x_t = sched.add_noise(image, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = net(torch.cat([x_t, cond], 1), t)
        loss = torch.nn.functional.mse_loss(v.float(), (image - noise).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return net, step


def evaluation(net, dev, image, cond):
    x = torch.cat([image, cond], 1)
    t = torch.full((image.shape[0],), 500.0, device=dev)

    @torch.no_grad()
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x, t)

    return run


def sample25(tr, dev, image, cond):
    """A 25-step Euler sample of the whole batch through medgen's generate()."""
    from medgen_cli.engine.sampling import generate
    from medgen_cli.runtime import autocast

    noise = torch.randn_like(image)
    return lambda: generate(tr.model.eval(), tr.strategy, noise, cond, "euler", 25, autocast(dev, "bf16"))


def bench(name: str, iters: int) -> dict:
    from medgen_cli.config import load

    dev = torch.device("cuda")
    out = {"preset": name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for label, ckpt in (("medgen", None), ("medgen-nockpt", False)):
        sets = [] if ckpt is None else ["model.gradient_checkpointing=false"]
        preset = load(name, sets).preset
        image, cond = batch_for(preset, dev)
        tr, step = medgen_step(preset, dev, image, cond)
        out[f"{label}_step_s"] = timed(step, iters)
        out[f"{label}_peak_gib"] = peak(step)
        if ckpt is None:
            out["medgen_eval_s"] = timed(evaluation(tr.model.eval(), dev, image, cond), iters)
            out["medgen_sample25_s"] = timed(sample25(tr, dev, image, cond), 2, warmup=1)
        del tr, step
        gc.collect()
        torch.cuda.empty_cache()
    preset = load(name).preset
    image, cond = batch_for(preset, dev)
    try:
        net, step = plain_step(preset, dev, image, cond)
        out["plain_step_s"] = timed(step, iters)
        out["plain_peak_gib"] = peak(step)
        out["plain_eval_s"] = timed(evaluation(net.eval(), dev, image, cond), iters)
    except torch.OutOfMemoryError:
        out["plain"] = "out of memory"
        return out
    finally:
        net = step = None
        gc.collect()
        torch.cuda.empty_cache()
    out["ratio_step"] = out["plain_step_s"] / out["medgen_step_s"]
    out["ratio_step_nockpt"] = out["plain_step_s"] / out["medgen-nockpt_step_s"]
    out["ratio_eval"] = out["plain_eval_s"] / out["medgen_eval_s"]
    if preset.data.dims == 2 and "plain_step_s" in out:
        b = preset.train.batch_size
        out["medgen_train_img_s"] = b / out["medgen-nockpt_step_s"]
        out["plain_train_img_s"] = b / out["plain_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["3d-pixel-128", "3d-pixel-256", "2d-pixel-128", "2d-pixel-256"])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    for name in args.presets:
        print(json.dumps(bench(name, args.iters)), flush=True)


if __name__ == "__main__":
    main()
