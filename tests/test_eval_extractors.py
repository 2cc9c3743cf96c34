"""Feature extractors load real files offline: random weights of the right shapes, expected names."""

from __future__ import annotations

import json

import pytest
import torch

from medgen_cli.errors import InputError
from medgen_cli.metrics import features

REPO_DIR = "models--" + features.BIOMEDCLIP_REPO.replace("/", "--")


def tiny_biomedclip(hf_cache, timm_name="vit_tiny_patch16_224", image_size=32, embed_dim=32):
    """A same-family open_clip checkpoint (timm ViT image tower) in HF-cache layout; returns snapshot dir."""
    from open_clip.model import _build_vision_tower

    vision = {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
              "timm_proj": "linear", "image_size": image_size}
    cfg = {"model_cfg": {"embed_dim": embed_dim, "vision_cfg": vision,
                         "text_cfg": {"hf_model_name": "not-needed", "context_length": 256}},
           "preprocess_cfg": {"mean": list(features.CLIP_MEAN), "std": list(features.CLIP_STD)}}
    torch.manual_seed(0)
    tower = _build_vision_tower(embed_dim, vision)
    features._fit_input_size(tower, image_size)
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)
    state["text.proj.weight"] = torch.zeros(2, 2)
    base = hf_cache / REPO_DIR
    snap = base / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123abc")
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(state, snap / "open_clip_pytorch_model.bin")
    return snap


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "medgen-cache"))
    for k in ("MEDGEN_WEIGHTS_DIR", "MEDGEN_WEIGHTS_RESNET50_IMAGENET", "MEDGEN_WEIGHTS_BIOMEDCLIP", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_missing_weights_lists_every_place(offline_caches):
    with pytest.raises(InputError) as e:
        features.load("resnet50-imagenet")
    text = "\n".join(e.value.lines())
    assert "MEDGEN_WEIGHTS_RESNET50_IMAGENET" in text and "resnet50-0676ba61.pth" in text
    assert str(offline_caches / "torch" / "hub" / "checkpoints") in text and "--weights" in text
    with pytest.raises(InputError) as e:
        features.load("biomedclip")
    assert "models--microsoft--BiomedCLIP" in "\n".join(e.value.lines())


def test_resnet50_from_torch_hub_cache_equals_torchvision(offline_caches):
    """Our ResNet50 (no torchvision import) loads torchvision's file strictly and computes the same features
    as torchvision's resnet50 with fc removed, on the same random weights, fp32 and bf16 autocast."""
    import torchvision

    from medgen_cli.metrics.weights import sha256_file

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    tv = torchvision.models.resnet50(weights=None)
    state = _random_state(tv)
    torch.save(state, ck / features.RESNET50_FILE)  # without num_batches_tracked, as older exports
    ext = features.load("resnet50-imagenet", device="cpu")
    assert ext.dim == 2048 and ext.sha256 == sha256_file(ck / features.RESNET50_FILE)
    assert "bilinear 224x224" in ext.preprocessing and "fp32" in ext.preprocessing
    assert set(ext.net.state_dict()) == set(tv.state_dict())  # the same keys, num_batches_tracked included
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    out = ext(x)
    tv.fc = torch.nn.Identity()
    tv.eval()
    up = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False).clamp(0, 1)
    mean = torch.tensor(features.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(features.IMAGENET_STD).view(1, 3, 1, 1)
    inp = (up.expand(-1, 3, -1, -1) - mean) / std
    with torch.no_grad():
        assert torch.equal(out, tv(inp))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ext.net(inp), tv(inp))


def test_wrong_shapes_is_an_input_error(offline_caches, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="ResNet50"):
        features.load("resnet50-imagenet", weights=bad)


def test_biomedclip_same_family_from_hf_cache(offline_caches):
    snap = tiny_biomedclip(offline_caches / "hf")
    ext = features.load("biomedclip", device="cpu")
    assert ext.weights_path == str(snap / "open_clip_pytorch_model.bin") and ext.dim == 32 and ext.size == 32
    out = ext(torch.rand(3, 1, 48, 48))
    assert out.shape == (3, 32)
    again = features.load("biomedclip", weights=snap, device="cpu")  # --weights as a snapshot folder
    assert torch.allclose(again(torch.ones(1, 1, 32, 32) / 2), ext(torch.ones(1, 1, 32, 32) / 2))


@pytest.mark.slow
def test_full_biomedclip_architecture(offline_caches):
    tiny_biomedclip(offline_caches / "hf", "vit_base_patch16_224", 224, 512)
    ext = features.load("biomedclip", device="cpu")
    assert ext(torch.rand(2, 1, 256, 256)).shape == (2, 512)


def _random_state(net, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_radimagenet_extractor_from_hub_cache(offline_caches):
    from medgen_cli.metrics import nets

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    net = nets.KerasResNet50()
    torch.save(_random_state(net), ck / features.RADIMAGENET_FILE)
    ext = features.load("radimagenet-resnet50", device="cpu")
    assert ext.dim == 2048 and ext.size == 224 and len(ext.sha256) == 64
    assert "BGR" in ext.preprocessing and "std [1.0, 1.0, 1.0]" in ext.preprocessing
    x = torch.rand(2, 1, 48, 48)
    out = ext(x)
    up = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    mean = torch.tensor(features.RADIMAGENET_BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net.eval()(up.expand(-1, 3, -1, -1) - mean).mean((2, 3))
    assert out.shape == (2, 2048) and torch.allclose(out, want, rtol=1e-4, atol=1e-5)
    # the stride sits on the first 1x1 convolution (Keras), so the file's shapes are torchvision's + biases
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)


def test_fid_inception_matches_torchvision_layout_and_loads(offline_caches):
    import torchvision.models.inception as tvi

    from medgen_cli.metrics import nets

    ours = nets.FIDInception()
    tv = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    theirs = {k: v.shape for k, v in tv.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs  # the ported file's keys and shapes
    state = _random_state(ours)
    tv.load_state_dict(state, strict=False)
    tv.eval(), ours.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # blocks agree with torchvision's except where the FID graph pools differently
        x = torch.rand(1, 288, 9, 9, generator=g)
        assert torch.allclose(ours.Mixed_6a(x), tv.Mixed_6a(x), atol=1e-5)
        x = torch.rand(1, 192, 7, 7, generator=g)
        a, b = ours.Mixed_5b(x), tv.Mixed_5b(x)
        assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)  # interior: padding unused
        assert not torch.allclose(a, b, atol=1e-5)  # border: the average excludes the padding
        x = torch.rand(1, 768, 9, 9, generator=g)
        assert torch.allclose(ours.Mixed_7a(x), tv.Mixed_7a(x), atol=1e-5)
        a, b = ours.Mixed_6b(x), tv.Mixed_6b(x)
        assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)
        x = torch.rand(1, 1280, 5, 5, generator=g)
        a, b = ours.Mixed_7b(x), tv.Mixed_7b(x)
        assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)
    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(state, ck / features.FID_INCEPTION_FILE)
    ext = features.load("inception-v3", device="cpu")
    assert ext.size == 299 and ext.dim == 2048 and "mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]" in ext.preprocessing
    out = ext(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    bad = offline_caches / "tv.pth"
    torch.save(tv.state_dict() | {"AuxLogits.fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match="FID Inception"):
        features.load("inception-v3", weights=bad)


def test_fid_inception_equals_pytorch_fid_on_random_weights(offline_caches):
    """pytorch-fid's InceptionV3 (the literature's FID features) and our inception-v3 extractor read the same
    file — random weights of the real shapes under the real name in the torch hub cache, where pytorch-fid
    looks before downloading — and give the same 2048-d features."""
    pf = pytest.importorskip("pytorch_fid.inception")
    from medgen_cli.metrics import nets

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(_random_state(nets.FIDInception(), seed=3), ck / features.FID_INCEPTION_FILE)
    assert pf.FID_WEIGHTS_URL.endswith("/" + features.FID_INCEPTION_FILE)
    ext = features.load("inception-v3", device="cpu", precision="fp32")
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True).eval()
    x = torch.rand(2, 1, 96, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x.expand(-1, 3, -1, -1))[0].flatten(1)
    got = ext(x)
    assert want.abs().max() > 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow
def test_torchvision_inception_is_registered_apart(offline_caches):
    import torchvision

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
               ck / features.TV_INCEPTION_FILE)
    ext = features.load("inception-v3-torchvision", device="cpu")
    assert ext(torch.rand(1, 1, 64, 64)).shape == (1, 2048)
    with pytest.raises(InputError):
        features.load("inception-v3")  # the FID network's file is a different one


@pytest.mark.slow
def test_fid_inception_equals_pytorch_fid_with_the_real_file():
    """Equality with pytorch-fid's features (hence its FID numbers) needs the real ported weights
    (pt_inception-2015-12-05-6726825d.pth, 91 MB) and the pytorch-fid package; random weights can only
    check the layout (above). Skipped when either is absent (this workplace has neither)."""
    try:
        path = features.find_weights("inception-v3")
    except InputError:
        pytest.skip("pt_inception-2015-12-05-6726825d.pth not found offline")
    pf = pytest.importorskip("pytorch_fid.inception")
    ext = features.load("inception-v3", weights=path, device="cpu", precision="fp32")
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True).eval()
    x = torch.rand(4, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x.expand(-1, 3, -1, -1))[0].flatten(1)
    assert torch.allclose(ext(x), want, rtol=1e-4, atol=1e-4)
