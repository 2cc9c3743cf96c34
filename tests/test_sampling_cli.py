"""`medgen sample` options, paired datasets, `medgen data atlas`, `medgen eval solvers|optimal-steps`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medgen_cli.data.atlas import check_mask
from medgen_cli.jobs.sweep import golden_section, grid


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phantom_root):
    """One-step 2D bravo and seg runs at 32 px (trained once for the module)."""
    from medgen_cli.cli.app import run

    from conftest import TINY_2D

    base = tmp_path_factory.mktemp("sampling-runs")
    out = {}
    for mode in ("bravo", "seg"):
        preset = base / f"{mode}.toml"
        preset.write_text(TINY_2D.format(mode=mode, strategy="rflow"))
        out[mode] = base / mode
        code = run(["train", "--preset", str(preset), "--data", str(phantom_root), "--run-dir", str(out[mode]),
                    "--max-steps", "1", "--set", "data.image_size=32", "--set", "train.preview_every=0",
                    "--set", "train.val_max_items=1"])
        assert code == 0
    return out


def _recs(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sample_options_reach_the_records(cli, runs, tmp_path, caplog):
    r = cli("sample", "--run", runs["bravo"], "--out", tmp_path / "a", "--n", 2, "--solver", "heun3", "--steps", 2,
            "--cfg", 2, "--cfg-end", 1, "--grid", "uniform", "--json")
    assert r.code == 0, r.err
    rec = _recs(r.out)[0]
    assert (rec["solver"], rec["nfe"], rec["cfg"], rec["cfg_end"], rec["cfg_batched"], rec["model_evals"]) == \
        ("heun3", 6, 2.0, 1.0, True, 12)
    assert "condition dropout" in caplog.text
    r = cli("sample", "--run", runs["bravo"], "--out", tmp_path / "c", "--n", 1, "--steps", 4,
            "--restart", "1,2,0.1,0.5", "--json")
    assert r.code == 0, r.err and _recs(r.out)[0]["nfe"] == 6


@pytest.mark.parametrize("args, where", [(["--solver", "rk5"], "rk4"), (["--atol", "1e-3"], "--atol"),
                                         (["--restart", "1,2"], "--restart"), (["--solver", "ddim"], "--solver")])
def test_sample_usage_errors(cli, runs, tmp_path, args, where):
    r = cli("sample", "--run", runs["bravo"], "--out", tmp_path / "x", *args)
    assert r.code == 2 and where in r.err and not (tmp_path / "x").exists()


def test_cfg_on_a_seg_model_is_a_usage_error(cli, runs, tmp_path):
    r = cli("sample", "--run", runs["seg"], "--out", tmp_path / "x", "--cfg", 2)
    assert r.code == 2 and "unconditional" in r.err


def test_check_mask_rules():
    atlas = np.zeros((4, 10, 10), bool)
    atlas[:, 2:8, 2:8] = True
    assert check_mask(np.zeros((4, 10, 10)), atlas, 0.04)[1] == "empty"
    m = np.zeros((4, 10, 10))
    m[1, 0, 0] = 1  # a tumour outside the atlas only
    assert check_mask(m, atlas, 0.04)[1] == "outside-atlas"
    m[2, 4:6, 4:6] = 1  # 4 % of a slice, inside: kept, the outside one removed
    cleaned, why = check_mask(m, atlas, 0.04)
    assert why is None and cleaned.sum() == 4 and not cleaned[1, 0, 0]
    assert check_mask(m, atlas, 0.03)[1] == "too-large"
    assert check_mask(m[2], atlas.any(0), 0.04)[1] is None  # 2D


def test_atlas_and_paired_dataset(cli, runs, phantom_root, tmp_path):
    r = cli("data", "atlas", phantom_root, "--size", 32, "--out", tmp_path / "atlas.nii.gz")
    assert r.code == 0, r.err
    atlas = nib.load(str(tmp_path / "atlas.nii.gz"))
    assert atlas.shape == (32, 32, 16) and 0 < np.asarray(atlas.dataobj).mean() < 1
    out = tmp_path / "pairs"
    r = cli("sample", "--run", runs["bravo"], "--paired", "--mask-run", runs["seg"], "--atlas", tmp_path / "atlas.nii.gz",
            "--out", out, "--n", 2, "--steps", 2, "--mask-steps", 2, "--max-retries", 1,
            "--max-tumour-fraction", 1.0, "--json")
    assert r.code == 0, r.err
    log = _recs((out / "paired.jsonl").read_text())
    summary = log[-1]
    assert summary["kind"] == "paired-summary" and summary["requested"] == 2
    assert summary["produced"] + summary["failed"] == 2 and len(log) == 3
    for rec in _recs(r.out):
        folder = out / "train" / f"{rec['index']:05d}"
        seg = np.asarray(nib.load(str(folder / "seg.nii.gz")).dataobj)
        assert seg.shape == (32, 32, 1) and seg.any() and nib.load(str(folder / "bravo.nii.gz")).shape == (32, 32, 1)
    # masks of a real split, same layout
    r = cli("sample", "--run", runs["bravo"], "--paired", "--split", "val", "--out", tmp_path / "real", "--n", 2,
            "--steps", 2)
    assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "real" / "train" / "00001").iterdir()) == ["bravo.nii.gz", "seg.nii.gz"]


def test_golden_section_finds_the_peak_with_few_points():
    calls = []
    best, seen = golden_section(lambda k: calls.append(k) or -(k - 23) ** 2, 10, 50)
    assert best == 23 and len(calls) == len(set(calls)) == len(seen) < 15


def test_reference_grid_has_33_configurations():
    assert len(grid(restart=False)) == 33 and len(grid()) == 40


def test_solver_sweep_is_resumable(cli, runs, tmp_path, caplog):
    out = tmp_path / "sweep"
    args = ("eval", "solvers", "--run", runs["bravo"], "--out", out, "--n", 1, "--steps", 2, "--steps", 3, "--solver", "euler",
            "--metric", "psnr", "--ref", "real", "--json")
    r = cli(*args, "--no-restart")
    assert r.code == 0, r.err
    recs = _recs(r.out)
    assert [x["config"] for x in recs] == ["euler-2", "euler-3"] and recs[1]["nfe"] == 3
    assert (out / "table.md").is_file() and (out / "nfe-psnr.png").is_file()
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # a crash mid-write
    caplog.clear()
    r = cli(*args, "--no-restart")
    assert r.code == 0 and "euler-2: cached" in caplog.text and "euler-3: nfe" in caplog.text
    caplog.clear()
    r = cli("eval", "optimal-steps", "--run", runs["bravo"], "--out", out, "--n", 1, "--lo", 2, "--hi", 6, "--ref", "real",
            "--json")
    assert r.code == 0, r.err
    assert sum(x["best"] for x in _recs(r.out)) == 1 and "euler-3: cached" in caplog.text


def test_solver_sweep_with_fid_against_a_split(cli, runs, phantom_root, tmp_path, monkeypatch):
    """fid in the sweep: the --feature-ref split's features (offline ResNet50 weights), one value per
    configuration, lower is better in optimal-steps."""
    import torch
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), ck / "resnet50-0676ba61.pth")
    out = tmp_path / "sweep"
    r = cli("eval", "solvers", "--run", runs["bravo"], "--out", out, "--n", 2, "--steps", 2, "--solver", "euler",
            "--metric", "fid", "--feature-ref", "val", "--no-restart", "--json")
    assert r.code == 0, r.err
    recs = _recs(r.out)
    assert [x["name"] for x in recs] == ["fid"] and recs[0]["extractor"] == "resnet50-imagenet"
    assert recs[0]["value"] >= 0 and recs[0]["weights_sha256"] and (out / "nfe-fid.png").is_file()


def test_compile_with_diffrs_is_refused(cli, runs, tmp_path):
    r = cli("sample", "--run", runs["bravo"], "--out", tmp_path / "s", "--compile", "--diffrs", runs["bravo"])
    assert r.code == 2 and "--compile" in r.err and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_compiled_sampling_matches_eager_on_cpu(cli, runs, tmp_path):
    """`--compile` off CUDA compiles in fp32 (engine/fastpath.py): the same samples within 1e-4."""
    import nibabel as nib
    import numpy as np

    for name, flag in (("eager", "--no-compile"), ("fast", "--compile")):
        r = cli("sample", "--run", runs["bravo"], "--out", tmp_path / name, "--n", 2, "--steps", 3, flag, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out.splitlines()[0])["fast_path"] is (flag == "--compile")
    for i in ("00000", "00001"):
        a, b = (nib.load(str(tmp_path / d / i / "bravo.nii.gz")).get_fdata() for d in ("eager", "fast"))
        assert np.abs(a - b).max() < 1e-4
