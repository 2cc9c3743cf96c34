"""presets/INDEX.toml covers every 2D diffusion experiment (EXPERIMENTS.md §A) and every pixel-space 3D
diffusion experiment (§B): each id has a preset that validates and builds on `meta` with the document's
parameter count (±2 %) where the document gives one. The id list lives here; when the reference document
is readable (../shared/reference beside the checkout, or $MEDGEN_REFERENCE) it is checked against it."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from medgen_cli.config import load, presets_dir

# id → parameters the document gives (None: no count given for that row). "default UNet" rows: 18.5M
# (2D, the ScoreAug omega MLP adds 0.28M = 1.5 %), "default_3d": 269.6M.
U2, U3 = 18.5e6, 269.6e6
SECTION_A = {
    "exp1_rflow": U2, "exp1_2_ddpm": U2, "exp1_3_continuous": U2, "exp2_rflow_100steps": U2, "exp2_bf16mse": U2,
    "exp3_rflow_100+a": U2, "exp4_rflow_100+a+ema": U2, "exp5_rflow_100+a+ema+m_snr": U2,
    "exp5_1_rflow_100_m_snr": U2, "exp6_rflow_256": U2, "exp7_rflow_256_4lvl": 51.0e6,
    "exp8_1_small": 11.1e6, "exp8_2_minimal": 4.4e6, "exp8_3_tiny": 2.7e6, "exp8_4_lean4lvl": 12.8e6,
    "exp8_5_lean5lvl": 13.2e6, "exp8_6_bottleneck": 18.1e6, "exp8_7_deep_narrow": 10.9e6, "exp8_8_adm": 92.2e6,
    "exp8_9_edm": 61.0e6, "exp8_10_ddpm": 76.7e6, "exp8_11_iddpm": 122.4e6,
    "exp9_1_scoreaug": U2, "exp9_2_scoreaug_full": U2, "exp9_3_scoreaug_combined": U2, "exp9_4_scoreaug_v2": U2,
    "exp9_5_scoreaug_compose": U2, "exp9_6_scoreaug_compose08": U2, "exp9_7_scoreaug_v2": U2,
    "exp10_1_multi": None, "exp10_2_multi_scoreaug": None, "exp10_3_multi_compose": None, "exp10_4_multi": None,
    "exp10_5_multi_scoreaug": None, "exp10_6_multi_dropout": None, "exp10_7_multi_none": None,
    "exp10_8_multi_late": None, "exp10_9_multi_film": None, "exp10_10_multi_film_scoreaug": None,
    "exp11_1_sam": U2, "exp11_2_asam": U2,
    # SiT "≈33M"/"≈130M" are rounded paper figures (tests/test_config.py checks them at ±4 %)
    "exp12_1_sit_s": None, "exp12_1b_sit_s": None, "exp12_1c_sit_s": None, "exp12_2_sit_b": None,
    "exp12_2b_sit_b": None, "exp13_1_ema_simple": U2, "exp13_2_ema_slow": U2, "exp14_1_sit_s_drop01": None,
    "exp14_2_sit_s_drop02": None, "exp14_3_sit_s_drop03": None, "exp15_1_rflow_wd001": U2,
    "exp15_2_rflow_wd005": U2, "exp15_3_rflow_wd01": U2, "exp16_bs4": U2, "exp16_bs8": U2, "exp16_bs24": U2,
    "exp16_bs32": U2, "exp17_1_droppath": None, "exp17_2_droppath": None, "exp17_3_droppath": None,
    "exp18_1_sda": U2, "exp19_1_constant_lr": U2, "exp20_1_grad_noise": U2, "exp21_1_curriculum": U2,
    "exp22_1_timestep_jitter": U2, "exp23_1_noise_aug": U2, "exp24_1_feature_perturb": U2,
    "exp25_1_self_cond": U2, "exp26_regional_weight": U2, "exp27_plateau": U2,
}
SECTION_B = {
    "exp1": U3, "exp1_1": U3, "exp1_chained": U3, "exp2": None, "exp2_1": None, "exp2b": U3, "exp2b_1": U3,
    "exp2c": 271e6, "exp2c_1": 271e6, "exp4": U3, "exp5_1": U3, "exp7": 134.5e6, "exp8": U3,
    "exp11": 1.424e9, "exp11_1": 1.424e9, "exp12": 1.424e9, "exp12_1": 1.424e9, "exp12_2": 74.2e6,
    "exp12_3": 76.8e6, "exp12_4": 76.8e6, "exp14_1": U3,
}
# ControlNet two-stage training (stage 1 unconditional 1 -> 1): indexed, validated and built like the rest.
CONTROLNET = {"exp6a": "ControlNet two-stage training (stage 1 unconditional 1 -> 1)"}
# Variants that must be indexed besides the plain id.
VARIANTS = {("3d-diffusion", "exp4"): "exp4_1 (noise shift 0.05)", ("3d-diffusion", "exp7"): "2000 epochs"}
NOT_COVERED = {
    "exp9": "latent-space LDM: comes with the compression models", "exp9_0": "latent-space LDM",
    "exp9_1": "latent-space LDM", "exp10_1": "DC-AE latent + DiT", "exp10_2": "DC-AE latent (crashed config)",
    "exp10_3": "DC-AE latent (crashed config)", "exp13": "DiT on the VQ-VAE latent",
    "exp1 gen 128": "generation run (medgen sample / chain), not a training preset",
    "exp1_1 gen 256": "generation run, not a training preset", "Euler step sweep": "sampling evaluation",
    "ODE solver grid": "sampling evaluation", "DiffRS head": "DiffRS: another engineer's part",
    "DiffRS run 1": "DiffRS sampling evaluation", "DiffRS run 2": "DiffRS sampling evaluation",
    "Restart": "sampling evaluation",
}


def _index() -> list[dict]:
    return tomllib.loads((presets_dir() / "INDEX.toml").read_text())["experiment"]


def _reference() -> Path | None:
    env = os.environ.get("MEDGEN_REFERENCE")
    cands = [Path(env) / "EXPERIMENTS.md"] if env else []
    cands.append(Path(__file__).resolve().parents[2] / "shared" / "reference" / "EXPERIMENTS.md")
    return next((c for c in cands if c.is_file()), None)


def _doc_ids(text: str, section: str) -> list[str]:
    """Ids in the first column of the section's table rows: "exp9_1_scoreaug (×2)" → "exp9_1_scoreaug"."""
    body = text.split(f"## {section}.", 1)[1].split("\n## ", 1)[0]
    ids = []
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith("| ID") or line.startswith("|---"):
            continue
        ids.append(re.sub(r"\s*\(.*$", "", line.split("|")[1].strip()))
    return ids


def test_id_list_matches_the_reference_document():
    ref = _reference()
    if ref is None:
        pytest.skip("reference/EXPERIMENTS.md not beside the checkout; the list in this test is used")
    text = ref.read_text()
    assert set(_doc_ids(text, "A")) == set(SECTION_A)
    assert set(_doc_ids(text, "B")) == set(SECTION_B) | set(CONTROLNET) | set(NOT_COVERED)


@pytest.mark.parametrize("domain, eid", [("2d-diffusion", i) for i in SECTION_A] + [("3d-diffusion", i) for i in SECTION_B]
                         + [("3d-diffusion", i) for i in CONTROLNET])
def test_every_experiment_has_a_preset_that_builds_with_the_documented_size(domain, eid):
    from medgen_cli.jobs.build import count_parameters

    entries = [e for e in _index() if e["domain"] == domain and e["id"] == eid]
    assert entries, f"{eid} has no preset in presets/INDEX.toml"
    if (domain, eid) in VARIANTS:
        assert any(VARIANTS[(domain, eid)] == e["variant"] for e in entries)
    for e in entries:
        preset = load(e["preset"]).preset
        assert preset.experiment == eid
        header = (presets_dir() / f"{e['preset']}.toml").read_text()
        assert eid in header.splitlines()[0] and f"--preset {e['preset']}" in header
        want = (SECTION_A if domain == "2d-diffusion" else SECTION_B).get(eid)
        if want is not None:
            n = count_parameters(preset)
            assert abs(n / want - 1) < 0.02, f"{e['preset']}: {n / 1e6:.2f}M vs {want / 1e6:.1f}M"


def test_not_covered_ids_are_not_indexed_and_exp25_1_consistency_is_refused_with_its_reason():
    from medgen_cli.errors import ConfigError

    indexed = {e["id"] for e in _index() if e["domain"] in ("2d-diffusion", "3d-diffusion")}
    assert not set(NOT_COVERED) & indexed, set(NOT_COVERED) & indexed
    with pytest.raises(ConfigError) as err:
        load(str(Path(__file__).resolve().parents[1] / "presets" / "refused" / "2d-pixel-128-selfcond-consistency.toml"))
    text = "\n".join(err.value.lines())
    assert "deterministic UNet" in text and 'self_conditioning = "x0"' in text  # points to the intended option
    # the shipped exp25_1 preset runs the intended mechanism
    (entry,) = [e for e in _index() if e["id"] == "exp25_1_self_cond"]
    p = load(entry["preset"]).preset
    assert p.train.self_conditioning == "x0" and p.train.self_conditioning_prob == 0.5 and entry.get("note")
