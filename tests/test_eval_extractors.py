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


def test_resnet50_from_torch_hub_cache(offline_caches):
    import torchvision

    from medgen_cli.metrics.weights import sha256_file

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), ck / features.RESNET50_FILE)
    ext = features.load("resnet50-imagenet", device="cpu")
    assert ext.dim == 2048 and ext.sha256 == sha256_file(ck / features.RESNET50_FILE)
    out = ext(torch.rand(2, 1, 40, 40))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    assert "bilinear 224x224" in ext.preprocessing and "fp32" in ext.preprocessing


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
