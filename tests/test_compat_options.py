"""Reference-reproduction options, each proven to act (a test fails if it is ignored):
ScoreAug mode intensity scaling, compat.reference_bin_spacing, compat.first_mode_batches and
compat.val_perceptual (a warning and the plain MSE when the RadImageNet weights are absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen_cli.config import load
from medgen_cli.engine.trainer import Trainer
from medgen_cli.errors import ConfigError, InputError
from medgen_cli.jobs import build


def _refused(preset, sets, words):
    with pytest.raises(ConfigError) as e:
        load(str(preset), sets)
    text = "\n".join(e.value.lines())
    assert all(w in text for w in words), text


# ---- ScoreAug mode intensity scaling ----------------------------------------------------------------
def test_mode_intensity_config_rules(tiny_preset):
    on = 'train.scoreaug={mode="compose", mode_intensity=true}'
    _refused(tiny_preset(2), [on], ["mode_intensity", "multi"])
    _refused(tiny_preset(2, "multi"), ['train.scoreaug={mode="compose", mode_intensity=true, omega=false}'],
             ["omega"])
    _refused(tiny_preset(2, "multi"), ['train.scoreaug={mode="compose", mode_intensity=true, brightness=1.2}'],
             ["brightness"])
    assert load(str(tiny_preset(2, "multi")), [on]).preset.train.scoreaug.mode_intensity


def _multi_input(modes, side=16):
    from medgen_cli.data.datasets import mode_maps

    g = torch.Generator().manual_seed(0)
    x = torch.rand(len(modes), 2, side, side, generator=g)  # [x_t, mask]
    maps = torch.stack([mode_maps(m, (side, side)) if m is not None else torch.zeros(4, side, side) for m in modes])
    return torch.cat([x, maps], 1)


def test_mode_intensity_scales_the_noisy_image_and_fills_omega(tiny_preset):
    from medgen_cli.models.conditioning import MODE_INTENSITY

    p = load(str(tiny_preset(2, "multi")), ['train.scoreaug={mode="compose", mode_intensity=true}']).preset
    model = build.build_model(p).eval()
    seen = {}
    model.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("inp", a[0].clone()))
    model.omega_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("omega", a[1].clone()))
    modes = [0, 1, 2, 3, None]  # bravo, flair, t1_pre, t1_gd, dropped condition
    x = _multi_input(modes)
    t = torch.full((len(modes),), 50.0)
    with torch.no_grad():
        model(x, t)  # validation / sampling: identity omega + the modality
    factors = torch.tensor([*MODE_INTENSITY, 1.0])
    torch.testing.assert_close(seen["inp"][:, 0], x[:, 0] * factors.reshape(-1, 1, 1))
    torch.testing.assert_close(seen["inp"][:, 1:], x[:, 1:])  # the mask and the modality maps are untouched
    want = torch.zeros(len(modes), 4)
    want[torch.arange(4), torch.arange(4)] = 1
    torch.testing.assert_close(seen["omega"][:, 32:36], want)
    assert seen["omega"][:, :32].abs().max() == 0
    omega = torch.zeros(36)
    omega[0], omega[4] = 1.0, 1.0  # a rot90 from ScoreAug keeps its dims
    with torch.no_grad():
        model(x, t, omega=omega)
    assert torch.equal(seen["omega"][:, :32], omega[:32].expand(len(modes), -1))
    torch.testing.assert_close(seen["omega"][:, 32:36], want)
    # without the option nothing is scaled (the test above would fail if it were ignored)
    q = load(str(tiny_preset(2, "multi")), ['train.scoreaug={mode="compose"}']).preset
    plain = build.build_model(q).eval()
    plain.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("inp", a[0].clone()))
    with torch.no_grad():
        plain(x, t)
    assert torch.equal(seen["inp"], x)


def test_mode_intensity_acts_in_training_steps(tiny_preset, tmp_path):
    from medgen_cli.models.conditioning import MODE_INTENSITY

    class Multi(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            x = _multi_input([i % 4])[0]
            return {"image": x[:1], "cond": x[1:]}

    p = load(str(tiny_preset(2, "multi")), ['train.scoreaug={mode="compose", mode_intensity=true}']).preset
    model = build.build_model(p)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(("outer", a[0].clone())), with_kwargs=True)
    model.model.register_forward_pre_hook(lambda m, a: seen.append(("inner", a[0].clone())))
    ds = Multi()
    tr = Trainer(model, build.build_strategy(p), ds, ds, p.train, tmp_path, build.config_json(p), torch.device("cpu"))
    image, cond = next(tr._batches(0))
    tr._step(image, cond)
    (_, outer), (_, inner) = seen
    ids = outer[:, 2:6].mean((2, 3)).argmax(1)
    factors = torch.tensor(MODE_INTENSITY)[ids].reshape(-1, 1, 1)
    torch.testing.assert_close(inner[:, 0], outer[:, 0] * factors)


# ---- compat.reference_bin_spacing ---------------------------------------------------------------
def test_reference_bin_spacing_sizes_bins_with_the_hard_coded_spacing(tiny_preset, phantom_root):
    from medgen_cli.data.sizebins import size_bins
    from medgen_cli.jobs.sample import _produced_bins

    _refused(tiny_preset(3), ["compat.reference_bin_spacing=true"], ["reference_bin_spacing", "size-bin"])
    size = ["data.image_size=32"]  # the phantoms' own grid: 7.5 mm pixels in truth
    p = load(str(tiny_preset(3, "seg_conditioned")), [*size, "compat.reference_bin_spacing=true"]).preset
    ds = build.build_dataset(p, "train", phantom_root)
    plain = build.build_dataset(load(str(tiny_preset(3, "seg_conditioned")), size).preset, "train", phantom_root)
    assert ds.bin_spacing == build.REFERENCE_BIN_SPACING and plain.bin_spacing is None
    differ = False
    for i in range(len(ds)):
        it = ds[i]
        seg = it["image"][0, :ds.depth_of(i)].numpy()
        assert it["bins"].tolist() == size_bins(seg, (1.0, 0.9375, 0.9375)).tolist()  # (D, H, W)
        differ |= it["bins"].tolist() != plain[i]["bins"].tolist()
    assert differ  # the reference spacing shrinks tumours into smaller bins
    mask = (ds[0]["image"][0, :ds.depth_of(0)].numpy() > 0.5).astype(np.float32)
    assert _produced_bins(mask, p) == size_bins(mask, (1.0, 0.9375, 0.9375)).tolist()


# ---- compat.first_mode_batches ------------------------------------------------------------------
def test_first_mode_batches_mix_modalities_and_use_the_first_id(tiny_preset, phantom_root, tmp_path):
    from medgen_cli.data.datasets import MODE_IDS, SliceDataset

    _refused(tiny_preset(2), ["compat.first_mode_batches=true"], ["first_mode_batches", "multi"])
    p = load(str(tiny_preset(2, "multi")), ["compat.first_mode_batches=true"]).preset
    ds = SliceDataset(phantom_root, "train", "multi", image_size=16)
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, build.config_json(p),
                 torch.device("cpu"))
    batches = tr._epoch_batches(0)
    assert tr.steps_per_epoch == len(ds) // 4 == len(batches)
    mixed = [b for b in batches if len({ds.modality_of(i) for i in b}) > 1]
    assert mixed  # one pooled shuffle, as before the homogeneous-batch fix
    for k, (image, cond) in enumerate(tr._batches(0)):
        first = MODE_IDS[ds.modality_of(batches[k][0])]
        out = tr._condition(cond)
        assert torch.equal(out[:, :1], cond[:, :1])  # the mask stays each sample's own
        assert (out[:, 1 + first] == 1).all() and out[:, 1:].sum() == out.shape[0] * 16 * 16
        if batches[k] in mixed:
            assert not torch.equal(out, cond)
            break
    homogeneous = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path / "h", "{}",
                          torch.device("cpu"))
    assert all(len({ds.modality_of(i) for i in b}) == 1 for b in homogeneous._epoch_batches(0))


# ---- compat.val_perceptual ----------------------------------------------------------------------
@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "medgen-cache"))
    for k in ("MEDGEN_WEIGHTS_DIR", "MEDGEN_WEIGHTS_RADIMAGENET_RESNET50"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_val_perceptual_without_weights_warns_and_logs_plain_mse(cli, tiny_preset, phantom_root, tmp_path,
                                                                 no_weights):
    _refused(tiny_preset(3), ["compat.val_perceptual=true"], ["val_perceptual", "dims = 2"])
    r = cli("train", "--preset", tiny_preset(2), "--data", phantom_root, "--run-dir", tmp_path / "run",
            "--set", "compat.val_perceptual=true", "--device", "cpu", "--max-steps", 2)
    assert r.code == 0, r.err
    warn = [x for x in r.err.splitlines() if "compat.val_perceptual" in x]
    assert len(warn) == 1 and "MEDGEN_WEIGHTS_RADIMAGENET_RESNET50" in warn[0] and "Traceback" not in r.err
    vals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "val"]
    assert vals and all("val_perceptual" not in v for v in vals)


def test_val_perceptual_adds_the_weighted_radimagenet_distance(tiny_preset, tmp_path, no_weights):
    from medgen_cli.metrics import features, nets, perceptual
    from medgen_cli.engine.trainer import VAL_PERCEPTUAL_WEIGHT

    no_weights.mkdir(parents=True)
    torch.manual_seed(2)
    state = {k: v for k, v in nets.KerasResNet50().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, no_weights / features.RADIMAGENET_FILE)
    perceptual._RADNETS.clear()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(1, 32, 32, generator=g), "cond": torch.zeros(1, 32, 32)}

    p = load(str(tiny_preset(2)), ["data.image_size=32", "compat.val_perceptual=true"]).preset
    ds = Images()
    on = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path / "on", build.config_json(p),
                 torch.device("cpu")).validate()
    off = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path / "off", "{}",
                  torch.device("cpu")).validate()
    assert on["val_perceptual"] > 0 and on["val_mse"] == pytest.approx(off["val_loss"])
    assert on["val_loss"] == pytest.approx(on["val_mse"] + VAL_PERCEPTUAL_WEIGHT * on["val_perceptual"])
    assert "val_perceptual" not in off
