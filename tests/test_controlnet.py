"""ControlNet two-stage training: zero-initialised start, frozen UNet, toy runs end to end."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from medgen_cli import checkpoint as ckpt
from medgen_cli.models import build_unet
from medgen_cli.models.controlnet import ControlledUNet, build_controlnet, copy_encoder


def _unet(dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    unet = build_unet(dims, 1, 1, [8, 16], [False, True], 1, 8, norm_num_groups=8)
    with torch.no_grad():  # MONAI zero-initialises the output conv: a "trained" stage 1 is not zero
        for p in unet.out.parameters():
            p.normal_(0, 0.1)
    return unet


@pytest.mark.parametrize("dims", [2, 3])
def test_stage2_starts_as_stage1_and_unet_stays_frozen(dims):
    unet = _unet(dims)
    stage1 = ControlledUNet(unet)
    x = torch.randn(2, 2, *([8] * dims))  # image + mask channel
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        ref = stage1(x, t)
        assert torch.equal(ref, unet(x[:, :1], t))  # stage 1 ignores the mask
    cn = build_controlnet(unet, 1, [16])
    assert copy_encoder(unet, cn) > 0
    for p in cn.parameters():  # the residual paths start at zero: make the trunk non-trivial anyway
        if p.abs().sum() > 0:
            p.data.add_(0.01)
    model = ControlledUNet(unet, cn, 1.0, freeze_unet=True)
    with torch.no_grad():
        assert torch.equal(model(x, t), ref)  # zero convolutions: exactly the stage-1 model
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = (model(x, t) - x[:, 1:]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())  # bit-identical
    assert not any(p.requires_grad for p in model.unet.parameters())
    with torch.no_grad():
        out = model(x, t)
        assert not torch.allclose(out, ref)  # the ControlNet learned something
        zero = x.clone()
        zero[:, 1:] = 0
        assert not torch.allclose(model(zero, t), out)  # the mask matters: CFG's null branch differs
    joint = ControlledUNet(_unet(dims), build_controlnet(_unet(dims), 1), freeze_unet=False)
    assert all(p.requires_grad for p in joint.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_two_stage_runs_train_resume_and_sample(cli, tiny_preset, phantom_root, tmp_path, dims):
    quiet = ["--set", "train.preview_every=0", "--set", "train.val_max_items=1"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    r = cli("train", "--preset", tiny_preset(dims, "bravo", extra="[controlnet]\nstage = 1\n"), "--data",
            phantom_root, "--run-dir", s1, "--max-steps", 2, *quiet)
    assert r.code == 0, r.err
    r = cli("sample", "--run", s1, "--out", tmp_path / "u", "--n", 1, "--steps", 2, "--json")  # no --data needed
    assert r.code == 0, r.err
    rec = json.loads(r.out.splitlines()[0])
    assert rec["condition"] is None and not (tmp_path / "u" / "00000" / "seg.nii.gz").exists()
    assert cli("sample", "--run", s1, "--out", tmp_path / "v", "--cfg", 2).code == 2

    text = tiny_preset(dims, "bravo").read_text().replace("[train]\n", "[train]\ncond_dropout = 0.15\n")
    preset2 = tmp_path / "stage2.toml"
    preset2.write_text(text + f'[controlnet]\nstage = 2\nstage1_run = "{s1}"\n')
    r = cli("train", "--preset", preset2, "--data", phantom_root, "--run-dir", s2, "--max-steps", 2, *quiet)
    assert r.code == 0, r.err
    cfg = json.loads((s2 / "config.json").read_text())["preset"]["controlnet"]
    step1 = ckpt.resolve_step_dir(s1, "best")
    assert cfg["stage1_checkpoint"] == str(step1.resolve()) and cfg["stage1_loaded"] == "raw"
    assert cfg["stage1_sha256"] == hashlib.sha256((step1 / "model.safetensors.index.json").read_bytes()).hexdigest()
    w1 = ckpt.load_group(step1, "model")
    w2 = ckpt.load_group(ckpt.resolve_step_dir(s2, "latest"), "model")
    unet_keys = [k for k in w2 if k.startswith("unet.")]
    assert unet_keys and all(torch.equal(w2[k], w1[k]) for k in unet_keys)  # frozen: bit-identical
    assert any(k.startswith("controlnet.") for k in w2)
    r = cli("train", "--resume", "--run-dir", s2, "--max-steps", 3, *quiet)
    assert r.code == 0, r.err
    w3 = ckpt.load_group(ckpt.resolve_step_dir(s2, "latest"), "model")
    assert all(torch.equal(w3[k], w1[k]) for k in unet_keys)
    r = cli("sample", "--run", s2, "--data", phantom_root, "--out", tmp_path / "c", "--n", 1, "--steps", 2,
            "--cfg", 2.0, "--json")
    assert r.code == 0, r.err
    rec = json.loads(r.out.splitlines()[0])
    assert rec["condition"] and rec["cfg_batched"] and "without condition dropout" not in r.err
    assert (tmp_path / "c" / "00000" / "seg.nii.gz").is_file()


def test_stage2_without_stage1_run_is_a_config_error(cli, tiny_preset, phantom_root, tmp_path):
    r = cli("train", "--preset", tiny_preset(2, "bravo", extra="[controlnet]\nstage = 2\n"), "--data", phantom_root,
            "--run-dir", tmp_path / "r", "--max-steps", 1)
    assert r.code == 3 and "controlnet.stage1_run" in r.err
    r = cli("train", "--preset", tiny_preset(2, "seg", extra="[controlnet]\nstage = 1\n"), "--data", phantom_root,
            "--run-dir", tmp_path / "q", "--dry-run")
    assert r.code == 3 and "controlnet" in r.err
