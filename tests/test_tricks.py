"""Training tricks: each option changes training (none is silently ignored) and its math is right."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medgen_cli.config import load
from medgen_cli.diffusion import build_strategy
from medgen_cli.engine import tricks
from medgen_cli.engine.trainer import Trainer
from medgen_cli.jobs import build

from conftest import RandomPairs


def trained(tiny_preset, tmp_path, sets: list[str], steps: int = 3) -> dict[str, torch.Tensor]:
    p = load(str(tiny_preset(2)), ["train.warmup_epochs=0", "train.epochs=50", *sets]).preset
    ds = RandomPairs(n=16)
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, "{}",
                 torch.device("cpu"), min_snr_unsquared=p.compat.min_snr_rflow_unsquared)
    for image, cond in tr._batches(0):
        if tr.state.step == steps:
            break
        tr._step(image, cond)
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


OPTIONS = {
    "min-snr": ["train.min_snr_gamma=0.5"],
    "min-snr-unsquared": ["train.min_snr_gamma=0.5", "compat.min_snr_rflow_unsquared=true"],
    "grad-noise": ["train.grad_noise=0.05"],
    "noise-augmentation": ["train.noise_augmentation=0.1"],
    "timestep-jitter": ["train.timestep_jitter=0.05"],
    "curriculum": ["train.curriculum={epochs=2, start_max=0.3}"],
    "feature-perturbation": ["train.feature_perturbation=0.1"],
    "sam": ["train.sam={rho=0.05}"],
    "asam": ["train.sam={rho=0.5, adaptive=true}"],
    # --- scoreaug/sda; compat-dependent cases are in tests/test_scoreaug.py ---
    "scoreaug": ['train.scoreaug={mode="compose", compose_prob=1.0, omega=false}'],
    "sda": ["train.sda={prob=1.0}"],
    "regional-weighting": ["train.regional_weighting={}"],
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return {}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_changes_training(tiny_preset, tmp_path, baseline, name):
    if "w" not in baseline:
        baseline["w"] = trained(tiny_preset, tmp_path / "base", [])
    w = trained(tiny_preset, tmp_path / name, OPTIONS[name])
    diff = max((w[k] - baseline["w"][k]).abs().max().item() for k in w)
    assert diff > 1e-7, f"{name} did not change the weights"
    assert all(torch.isfinite(v).all() for v in w.values())


def test_min_snr_weights_match_the_formulas():
    t = torch.tensor([0.1, 0.5, 0.9])
    rf = build_strategy("rflow")
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(tricks.min_snr_weight(rf, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    snr1 = (1 - t) / t
    assert torch.allclose(tricks.min_snr_weight(rf, t, 5.0, unsquared=True), torch.clamp(snr1, max=5.0) / snr1)
    dd = build_strategy("ddpm")
    a = dd.alpha_bar(t)
    assert torch.allclose(tricks.min_snr_weight(dd, t, 5.0), torch.clamp(a / (1 - a), max=5.0) / (a / (1 - a)))


def test_spike_guard_skips_spikes_without_being_poisoned():
    g = tricks.SpikeGuard(factor=10.0, decay=0.99, warmup=5)
    assert not any(g.skip(1.0) for _ in range(10))
    assert g.skip(1000.0)
    assert g.state["mean"] <= 1.0 * 0.99 + 0.01 * 10.0 + 1e-9  # moved by at most (1-decay)*factor*mean
    assert not g.skip(1.0)
    skips = [g.skip(50.0) for _ in range(2000)]  # a lasting change of scale is learned, not skipped forever
    assert skips[0] and not skips[-1]


def test_plateau_scales_after_patience():
    p = tricks.Plateau(factor=0.5, patience=2)
    for v in (1.0, 0.9, 0.95, 0.95):
        p.observe(v)
    assert p.state["scale"] == 1.0
    p.observe(0.95)
    assert p.state["scale"] == 0.5


def test_noise_augmentation_keeps_unit_variance_and_curriculum_endpoints():
    g = torch.Generator().manual_seed(1)
    n, z = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    assert abs(tricks.augment_noise(n, z, 0.1).std().item() - 1.0) < 0.01
    assert tricks.curriculum_max(0, 50, 0.3) == 0.3 and tricks.curriculum_max(50, 50, 0.3) == 1.0
    assert math.isclose(tricks.curriculum_max(25, 50, 0.3), 0.65)


def test_sam_restores_the_weights_exactly():
    m = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(5, 4)).sum().backward()
    for adaptive in (False, True):
        moves = tricks.sam_perturb(m, 0.05, adaptive)
        assert any((p - before[k]).abs().max() > 0 for k, p in m.state_dict().items())
        tricks.sam_restore(moves)
        assert all(torch.allclose(p, before[k], atol=1e-7) for k, p in m.state_dict().items())


def test_plateau_schedule_lowers_the_lr(tiny_preset, tmp_path):
    p = load(str(tiny_preset(2)), ["train.schedule=\"plateau\"", "train.plateau_patience=1",
                                   "train.warmup_epochs=0"]).preset
    ds = RandomPairs(n=16)
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, "{}", torch.device("cpu"))
    for v in (1.0, 1.0, 1.0):
        tr._after_validation({"val_loss": v, "val_psnr": 0.0})
    assert math.isclose(tr._lr(100), p.train.lr * 0.5)


def test_curriculum_and_jitter_are_rflow_only():
    from medgen_cli.errors import ConfigError

    with pytest.raises(ConfigError):
        load("demo", ["diffusion.kind=\"ddpm\"", "train.timestep_jitter=0.05"])


def test_spike_skip_skips_the_optimizer_step(tiny_preset, tmp_path):
    """A batch with an exploding gradient leaves the weights as they were (and counts a skip)."""
    p = load(str(tiny_preset(2)), ["train.spike_skip={factor=3.0, warmup=0}", "train.grad_clip=1.0"]).preset
    ds = RandomPairs(n=16)
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, "{}", torch.device("cpu"))
    batches = list(itertools.islice(tr._batches(0), 3))
    tr._step(*batches[0])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    image, cond = batches[1]
    tr._step(image * 1e4, cond)  # gradient norm ~1e4 x the running mean
    assert tr.spike.state["skipped"] == 1
    assert all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    tr._step(*batches[2])
    assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
