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
