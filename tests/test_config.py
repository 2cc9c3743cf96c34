"""Presets: every shipped preset validates and builds on `meta` with the reference's size."""

from __future__ import annotations

import tomllib

import pytest

from medgen_cli.config import load, presets_dir, shipped_names
from medgen_cli.errors import ConfigError

# Parameter counts from reference/SYSTEM.md §4 (computed for the reference layouts).
REFERENCE_PARAMS = {
    "2d-pixel-128": 18.5e6,
    "2d-pixel-256": 18.5e6,
    "3d-pixel-128": 269.6e6,
    "3d-pixel-128-ema": 269.6e6,
    "3d-pixel-256": 269.6e6,
    "3d-seg-256": 269.6e6,
}


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_preset_validates_and_builds_on_meta(name):
    from medgen_cli.jobs.build import count_parameters

    preset = load(name).preset
    n = count_parameters(preset)
    if name in REFERENCE_PARAMS:
        assert abs(n / REFERENCE_PARAMS[name] - 1) < 0.02, f"{name}: {n / 1e6:.1f}M"
    header = (presets_dir() / f"{name}.toml").read_text().splitlines()[0]
    assert header.startswith("# "), "each preset starts with a header comment"


def test_index_maps_experiments_to_shipped_presets():
    index = tomllib.loads((presets_dir() / "INDEX.toml").read_text())
    names = set(shipped_names())
    ids = {(e["domain"], e["id"], e["variant"]) for e in index["experiment"]}
    assert len(ids) == len(index["experiment"])
    for e in index["experiment"]:
        assert e["preset"] in names
        assert load(e["preset"]).preset.experiment == e["id"]
    for wanted in ("exp1_3_continuous", "exp6_rflow_256", "exp1", "exp8", "exp1_1", "exp14_1"):
        assert wanted in {i for _, i, _ in ids}


def test_all_errors_reported_at_once_with_dotted_paths():
    with pytest.raises(ConfigError) as e:
        load("3d-pixel-128", ["train.lr=abc", "model.chanels=[1]", "train.ema.decay=2"])
    text = "\n".join(e.value.lines())
    assert "model.chanels: unknown key; did you mean 'channels'?" in text
    assert "train.lr:" in text and "train.ema.decay:" in text
    assert e.value.code == 3


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown preset") as e:
        load("3d-pixle-256")
    assert "3d-pixel-256" in e.value.hint


def test_set_parses_toml_literals_and_cross_field_checks():
    p = load("2d-pixel-128", ["model.channels=[64,128,128]", "train.lr=5e-5", "data.root=/x/y"]).preset
    assert p.model.channels == [64, 128, 128] and p.train.lr == 5e-5 and p.data.root == "/x/y"
    with pytest.raises(ConfigError) as e:
        load("2d-pixel-128", ["data.image_size=130"])
    assert "data.image_size=130 is not divisible by the model's down-sampling factor 4" in e.value.details[0]


def test_extends_relative_path_and_cycles(tmp_path):
    (tmp_path / "base.toml").write_text('extends = "2d-pixel-128"\n[train]\nlr = 3e-4\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.toml").write_text('extends = "../base.toml"\n[train]\nbatch_size = 8\n')
    p = load(str(tmp_path / "sub" / "child.toml"))
    assert p.preset.train.lr == 3e-4 and p.preset.train.batch_size == 8
    assert [f["path"].split("/")[-1] for f in p.files] == ["2d-pixel-128.toml", "base.toml", "child.toml"]
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load(str(tmp_path / "a.toml"))
