"""End to end in-process: train -> sample -> eval -> report, 2D and 3D, and piping records."""

from __future__ import annotations

import io
import json
import sys

import nibabel as nib
import numpy as np
import pytest


@pytest.mark.parametrize("dims, mode, strategy", [(2, "bravo", "rflow"), (2, "bravo", "ddpm"), (2, "seg", "rflow"),
                                                 (3, "bravo", "rflow"), (3, "seg", "ddpm")])
def test_train_sample_eval_report(cli, tiny_preset, phantom_root, tmp_path, dims, mode, strategy):
    run, out = tmp_path / "run", tmp_path / "samples"
    size = ["--set", "data.image_size=32"] if (dims, mode) == (2, "seg") else []  # 10-pixel tumour rule
    r = cli("train", "--preset", tiny_preset(dims, mode, strategy), "--data", phantom_root, "--run-dir", run,
            "--max-steps", 3, "--json", *size)
    assert r.code == 0, r.err
    r = cli("sample", "--run", run, "--out", out, "--n", 2, "--steps", 3, "--json")
    assert r.code == 0, r.err
    recs = [json.loads(line) for line in r.out.splitlines()]
    assert [x["index"] for x in recs] == [0, 1] and all(x["nfe"] == 3 for x in recs)
    assert recs[0]["solver"] == ("ddim" if strategy == "ddpm" else "euler")
    img = nib.load(recs[0]["path"])
    if dims == 3:
        assert img.shape == (16, 16, 16)  # depth trimmed back to the source's 16 slices
        assert np.allclose(img.header.get_zooms(), (240 / 16, 240 / 16, 1.0)) or mode == "bravo"
    else:
        assert img.shape[:2] == ((32, 32) if size else (16, 16))
    data = np.asarray(img.dataobj)
    if mode == "seg":
        assert set(np.unique(data)) <= {0, 1}
    else:
        assert data.min() >= 0 and data.max() <= 1
        src = nib.load(str(sorted((phantom_root / "val").iterdir())[0] / "seg.nii.gz"))
        sx = src.header.get_zooms()[0] * src.shape[0] / img.shape[0]
        assert np.isclose(img.header.get_zooms()[0], sx)  # affine adjusted for the in-plane resize
    assert (out / "previews" / "00000.png").is_file()
    r = cli("eval", "psnr", "--run", run, "--json", "--min", "psnr=1")
    assert r.code == 0, r.err
    m = json.loads(r.out.splitlines()[0])
    assert m["kind"] == "metric" and m["name"] == "psnr" and m["protocol"] == "one-step-x0"
    r = cli("eval", "msssim", "--run", run, "--json", "--max", "msssim=0.0")
    assert r.code == 6 and "msssim" in r.err
    r = cli("report", run)
    assert r.code == 0 and "| done |" in r.out and "psnr" in r.out


def test_records_pipe_through_stdin(cli, tiny_preset, phantom_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    r = cli("train", "--preset", tiny_preset(2), "--data", phantom_root, "--run-dir", run, "--max-steps", 2, "--json")
    monkeypatch.setattr(sys, "stdin", io.StringIO(r.out))
    r = cli("sample", "--run", "-", "--out", tmp_path / "a", "--n", 2, "--json")
    assert r.code == 0, r.err
    monkeypatch.setattr(sys, "stdin", io.StringIO(r.out))
    r = cli("eval", "psnr", "--gen", "-", "--ref", tmp_path / "a", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["value"] == 100.0  # identical files: the 100 dB cap


def test_same_index_same_sample_whatever_the_batch(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--preset", tiny_preset(2), "--data", phantom_root, "--run-dir", run,
               "--max-steps", 2).code == 0
    assert cli("sample", "--run", run, "--out", tmp_path / "b1", "--n", 3, "--batch-size", 1).code == 0
    assert cli("sample", "--run", run, "--out", tmp_path / "b3", "--n", 3, "--batch-size", 3).code == 0
    for i in range(3):
        a = nib.load(str(tmp_path / "b1" / f"{i:05d}" / "bravo.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / "b3" / f"{i:05d}" / "bravo.nii.gz")).get_fdata()
        assert np.abs(a - b).max() < 1e-5


def test_chain_demo_small_and_resumable(cli, tmp_path):
    """The demo chain with a shrunken model and data: every stage runs, a rerun redoes nothing,
    and the trained model beats its untrained self on the one-step PSNR (the full-size demo's margin
    is checked by the slow test below)."""
    d = tmp_path / "chain"
    small = ["--set", "chain.synth.size=32", "--set", "chain.synth.depth=16", "--set", "data.image_size=16",
             "--set", "model.channels=[8,16,16]", "--set", "model.num_head_channels=8", "--set", "model.norm_num_groups=8",
             "--set", "model.attention_levels=[false,false,true]", "--set", "train.epochs=6",
             "--set", "sample.n=2", "--set", "train.ema.start_step=1", "--set", "train.preview_every=0"]
    r = cli("chain", "--preset", "demo", "--dir", d, *small)
    assert r.code == 0, r.err
    assert "| done |" in r.out and (d / "report.md").is_file() and (d / "samples" / "00001").is_dir()
    done = json.loads((d / "chain.json").read_text())["done"]
    assert done == ["synth", "train", "sample", "eval", "report"]
    r2 = cli("chain", "--preset", "demo", "--dir", d, *small)
    assert r2.code == 0 and "already done" in r2.err
    evals = [json.loads(x) for x in (d / "run" / "eval.jsonl").read_text().splitlines()]
    trained = [e["value"] for e in evals if e["name"] == "psnr"][0]
    assert trained > _untrained_psnr(d / "run") + 0.5


def _untrained_psnr(run) -> float:
    """The same one-step protocol with the run's model at its initial (random) weights."""
    import torch

    from medgen_cli.config import validate
    from medgen_cli.jobs import build
    from medgen_cli.jobs.evaluate import one_step_scores

    preset = validate(json.loads((run / "config.json").read_text())["preset"])
    torch.manual_seed(0)
    ds = build.build_dataset(preset, "val")
    scores = one_step_scores("psnr", build.build_model(preset), preset, ds, torch.device("cpu"), len(ds))
    return float(np.mean(scores["psnr"]))


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """`medgen chain --preset demo` exactly as the README runs it (a subprocess, default sizes)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "medgen_cli", "chain", "--preset", "demo"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "demo-chain" / "run"
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    trained = [e["value"] for e in evals if e["name"] == "psnr"][0]
    assert trained > _untrained_psnr(run) + 3.0


def test_output_grid_keeps_orientation_origin_and_physical_centre(tmp_path):
    """Resize 32 -> 16 in-plane: the mask's affine keeps its axes, voxels double, the centre stays."""
    from medgen_cli.jobs.sample import model_grid

    aff = np.array([[0.0, -0.9375, 0.0, 10.0], [0.9375, 0.0, 0.0, -20.0], [0.0, 0.0, 1.2, 30.0], [0, 0, 0, 1]])
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.uint8), aff), str(path))
    spacing, new = model_grid(path, None, 16)
    assert np.allclose(spacing, (1.875, 1.875, 1.2))
    assert np.allclose(new[:3, :2] / np.linalg.norm(new[:3, :2], axis=0), aff[:3, :2] / 0.9375)
    centre_old = aff @ np.array([15.5, 15.5, 7.5, 1.0])
    centre_new = new @ np.array([7.5, 7.5, 7.5, 1.0])
    assert np.allclose(centre_old, centre_new)
    spacing, _ = model_grid(path, (1.0, 1.0, 1.0), 16)  # data.spacing overrides the header's sizes
    assert np.allclose(spacing, (2.0, 2.0, 1.0))
