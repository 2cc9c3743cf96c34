"""Paired perceptual metrics load real files offline (random weights, expected names) and agree with
the libraries whose semantics they follow: `lpips` (the package's own LPIPS) and the reference's
"LPIPS" (MONAI PerceptualLoss with the RadImageNet ResNet50)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen_cli.data.nifti import write_nifti
from medgen_cli.metrics import features, nets, perceptual

from test_eval_extractors import offline_caches  # noqa: F401  (fixture)


@pytest.fixture
def hub(offline_caches):  # noqa: F811
    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    perceptual._NETS.clear()
    perceptual._RADNETS.clear()
    return ck


def _alexnet_file(ck):
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.alexnet(weights=None)
    torch.save(net.state_dict(), ck / perceptual.ALEXNET_FILE)


def _radimagenet_file(ck, seed=2):
    torch.manual_seed(seed)
    net = nets.KerasResNet50()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that a mis-mapped buffer shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 0.6)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, ck / features.RADIMAGENET_FILE)
    return net


def test_lpips_matches_the_lpips_package(hub):
    import lpips

    _alexnet_file(hub)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 64, 64, generator=g), torch.rand(3, 1, 64, 64, generator=g)
    ours = perceptual.lpips_alex(a, b)
    assert ours.shape == (3,) and torch.isfinite(ours).all() and (ours > 0).all()
    # the package's own network: torchvision's loader finds the same file in $TORCH_HOME (no download)
    ref_net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=False).eval()
    with torch.no_grad():
        theirs = ref_net(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1), normalize=True).flatten()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    vol = perceptual.lpips_alex(a[None].transpose(1, 2), b[None].transpose(1, 2))  # (1, 1, D=3, H, W)
    assert vol.shape == (1,) and vol.item() == pytest.approx(ours.mean().item(), rel=1e-5)
    assert perceptual.lpips_sha256() == features.W.sha256_file(hub / perceptual.ALEXNET_FILE)


def test_radimagenet_perceptual_matches_monai(hub, monkeypatch):
    from monai.losses import PerceptualLoss

    net = _radimagenet_file(hub).eval()
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: net)  # MONAI would fetch the same network
    loss = PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 1, 40, 40, generator=g), torch.rand(4, 1, 40, 40, generator=g)
    ours = perceptual.perceptual_radimagenet(a, b)
    assert ours.shape == (4,)
    with torch.no_grad():
        per = torch.stack([loss(a[i:i + 1].clone(), b[i:i + 1].clone()) for i in range(4)])
        whole = loss(a.clone(), b.clone())
    assert torch.allclose(ours, per, rtol=1e-4, atol=1e-6)
    assert ours.mean().item() == pytest.approx(whole.item(), rel=1e-4)
    assert perceptual.perceptual_radimagenet(a, a).abs().max() < 1e-6
    # 3D: slice-wise (chunks of 32), averaged over the slices of each volume
    va, vb = torch.rand(2, 1, 34, 16, 16, generator=g), torch.rand(2, 1, 34, 16, 16, generator=g)  # 2 chunks
    v = perceptual.perceptual_radimagenet(va, vb)
    s = perceptual.perceptual_radimagenet(va[1].transpose(0, 1), vb[1].transpose(0, 1))
    assert v.shape == (2,) and v[1].item() == pytest.approx(s.mean().item(), rel=1e-5)


def test_radimagenet_wrong_file_is_an_input_error(hub):
    import torchvision

    from medgen_cli.errors import InputError

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), hub / features.RADIMAGENET_FILE)
    with pytest.raises(InputError, match="RadImageNet"):
        perceptual.perceptual_radimagenet(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))


def test_perceptual_radimagenet_cli(cli, hub, tmp_path):
    _radimagenet_file(hub)
    rng = np.random.default_rng(0)
    for i in range(2):
        x = rng.random((24, 24, 5), dtype=np.float32)
        write_nifti(tmp_path / "ref" / f"{i:05d}" / "bravo.nii.gz", x, spacing=(1, 1, 1))
        write_nifti(tmp_path / "gen" / f"{i:05d}" / "bravo.nii.gz", np.clip(x + 0.1, 0, 1), spacing=(1, 1, 1))
    r = cli("eval", "perceptual-radimagenet", "--gen", tmp_path / "gen", "--ref", tmp_path / "ref", "--json",
            "--device", "cpu")
    assert r.code == 0, r.err
    (rec,) = [json.loads(x) for x in r.out.splitlines()]
    assert rec["name"] == "perceptual-radimagenet" and rec["n_gen"] == 2 and rec["value"] > 0
    assert rec["extractor"] == "radimagenet-resnet50" and len(rec["weights_sha256"]) == 64
    assert "BGR" in rec["preprocessing"] and "MONAI" in rec["protocol"]
    r = cli("eval", "perceptual-radimagenet", "--gen", tmp_path / "gen", "--ref", tmp_path / "ref",
            "--weights", tmp_path / "nowhere.pth")
    assert r.code == 4 and "hint:" in r.err
