"""GPU paths (skipped without CUDA): bf16 training, sampling and eval through the CLI, 2D and 3D."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_train_sample_eval_on_cuda(cli, tiny_preset, phantom_root, tmp_path, dims):
    preset = tiny_preset(dims, extra='\n[train.ema]\nenabled = true\nstart_step = 1\nevery = 1\n')
    run = tmp_path / "run"
    r = cli("train", "--preset", preset, "--data", phantom_root, "--run-dir", run, "--device", "cuda",
            "--set", "train.precision=\"bf16\"", "--max-steps", 8, "--json")
    assert r.code == 0, r.err
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    r = cli("sample", "--run", run, "--out", tmp_path / "s", "--n", 2, "--steps", 4, "--device", "cuda", "--json")
    assert r.code == 0, r.err
    r = cli("eval", "psnr", "--run", run, "--device", "cuda", "--json")
    assert r.code == 0 and json.loads(r.out.splitlines()[0])["value"] > 0


def test_cuda_and_cpu_sampling_agree(cli, tiny_preset, phantom_root, tmp_path):
    """The same checkpoint, seed and index give the same sample on CPU and GPU (fp32, within 1e-3)."""
    import nibabel as nib
    import numpy as np

    preset = tiny_preset(2)
    run = tmp_path / "run"
    assert cli("train", "--preset", preset, "--data", phantom_root, "--run-dir", run, "--max-steps", 2).code == 0
    for dev in ("cpu", "cuda"):
        assert cli("sample", "--run", run, "--out", tmp_path / dev, "--n", 1, "--device", dev).code == 0
    a, b = (nib.load(str(tmp_path / d / "00000" / "bravo.nii.gz")).get_fdata() for d in ("cpu", "cuda"))
    assert np.abs(a - b).max() < 1e-3


def test_a_training_step_never_waits_for_the_gpu(tmp_path):
    """No host sync inside `Trainer._step` (CUDA's sync debug mode raises on one), so the host queues the
    next step while the GPU runs this one; the keyed times equal the CPU's draws."""
    from medgen_cli.config import load
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build
    from medgen_cli.runtime import rand_keyed, to_device

    keys = [(1, 2, i) for i in range(4)]
    assert torch.equal(rand_keyed(keys, "cuda").cpu(), rand_keyed(keys, "cpu"))
    torch.cuda.set_sync_debug_mode("error")
    try:  # the helper the per-step CPU-built tensors go through
        moved = to_device(torch.arange(5.0), "cuda", torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.dtype == torch.float16 and torch.equal(moved.cpu(), torch.arange(5.0).half())
    dev = torch.device("cuda")
    preset = load("2d-unet-tiny-128", ["train.batch_size=2", "train.ema.enabled=true"]).preset
    image = torch.rand(2, 1, 128, 128, device=dev)
    cond = (torch.rand_like(image) > 0.99).float()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": image[i].cpu(), "cond": cond[i].cpu()}

    tr = Trainer(build.build_model(preset), build.build_strategy(preset), Items(), Items(), preset.train,
                 tmp_path / "run", "{}", dev)
    for _ in range(2):  # first steps may set up (cuDNN, allocator)
        tr._step(image, cond)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = tr._step(image, cond)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats["loss"])


def test_a_guided_euler_step_never_waits_for_the_gpu():
    """The sampler's field with dynamic CFG, at a host time as the fixed-step solvers pass it: no sync."""
    from medgen_cli.config import load
    from medgen_cli.engine.sampling import CountingNet, Guidance, GuidedNet, _drift
    from medgen_cli.jobs import build

    preset = load("2d-unet-tiny-128").preset
    dev = torch.device("cuda")
    net = build.build_model(preset).to(dev).eval()
    cond = torch.zeros(1, 1, 32, 32, device=dev)
    guided = GuidedNet(CountingNet(net, cond), Guidance(2.0, 1.0), torch.zeros_like(cond), 1000)
    f = _drift(build.build_strategy(preset), guided, 1)
    x = torch.randn(1, 1, 32, 32, device=dev)
    t = torch.tensor(0.6, dtype=torch.float64)  # what the fixed-step solvers pass
    with torch.no_grad():
        f(x, t)  # first call sets up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            v = f(x, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
