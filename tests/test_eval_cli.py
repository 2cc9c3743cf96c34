"""`medgen eval fid|kid|cmmd|seg|bins|ssim` end to end on tiny phantoms (in-process CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medgen_cli import records
from medgen_cli.data.nifti import read_image, write_nifti

from test_eval_extractors import offline_caches, tiny_biomedclip  # noqa: F401  (fixture)


def _sample_folder(phantom_root, out, split="val", noise=0.0):
    """A folder shaped like `medgen sample` output, made from a split's bravo volumes and masks."""
    recs = []
    for i, p in enumerate(sorted((phantom_root / split).iterdir())):
        arr, sp, _ = read_image(p / "bravo.nii.gz")
        arr = (arr - arr.min()) / (arr.max() - arr.min())
        arr = np.clip(arr + noise * np.random.default_rng(i).normal(size=arr.shape), 0, 1)
        path = write_nifti(out / f"{i:05d}" / "bravo.nii.gz", arr.astype(np.float32), spacing=sp)
        shutil.copy(p / "seg.nii.gz", out / f"{i:05d}" / "seg.nii.gz")
        recs.append(records.make("sample", path=str(path), run="r", checkpoint="c", weights="ema", seed=0, index=i,
                                 solver="euler", steps=1, nfe=1, cfg=1.0, condition=str(p / "seg.nii.gz"),
                                 modality="bravo", shape=list(arr.shape), spacing=list(sp),
                                 data_root=str(phantom_root), split=split))
    (out / "samples.jsonl").write_text("".join(records.dumps(r) + "\n" for r in recs))
    return out


def _json(out):
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_fid_kid_cmmd_cli_with_cache_and_thresholds(cli, phantom_root, tmp_path, offline_caches):  # noqa: F811
    tiny_biomedclip(offline_caches / "hf")
    gen = _sample_folder(phantom_root, tmp_path / "gen", noise=0.05)
    r = cli("eval", "fid", "--gen", gen, "--ref", "train", "--extractor", "biomedclip", "--workers", "0", "--json")
    assert r.code == 0, r.err
    (fid,) = _json(r.out)
    assert fid["name"] == "fid" and fid["n_gen"] == 2 and fid["n_ref"] == 3 and fid["ref_cache_hit"] is False
    assert fid["n_gen_slices"] == 2 * 16 and fid["weights_sha256"] and fid["extractor"] == "biomedclip"
    assert fid["ref"].endswith("/train") and fid["value"] > 0
    r = cli("eval", "fid", "--gen", gen, "--ref", "train", "--extractor", "biomedclip", "--json", "--max", "fid=0")
    assert r.code == 6 and _json(r.out)[0]["ref_cache_hit"] is True
    assert _json(r.out)[0]["value"] == pytest.approx(fid["value"], rel=1e-6)
    r = cli("eval", "kid", "--gen", gen, "--ref", "all", "--extractor", "biomedclip", "--workers", "0", "--json")
    assert r.code == 0, r.err
    assert [x["name"] for x in _json(r.out)] == ["kid", "kid_standard"]
    assert all("subsets" in x["protocol"] for x in _json(r.out))
    r = cli("eval", "cmmd", "--gen", gen, "--ref", "val", "--workers", "0", "--json", "--ci", "--ci-replicates", "20",
            "--planes", "tri")
    assert r.code == 0, r.err
    cm = _json(r.out)
    assert [x["name"] for x in cm] == ["cmmd", "cmmd_standard"]
    assert cm[0]["n_gen_slices"] == 2 * (16 + 32 + 32) and len(cm[0]["ci"]) == 2
    assert cm[0]["ci"][0] <= cm[0]["ci"][1]


def test_missing_weights_exit_4(cli, phantom_root, tmp_path, offline_caches):  # noqa: F811
    gen = _sample_folder(phantom_root, tmp_path / "gen")
    r = cli("eval", "fid", "--gen", gen, "--ref", "train")
    assert r.code == 4 and "looked in" in r.err and "hint:" in r.err


def test_seg_and_bins_cli(cli, phantom_root, tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for i, p in enumerate(sorted((phantom_root / "val").iterdir())):
        m = read_image(p / "seg.nii.gz")[0]
        write_nifti(ref / f"{i:05d}" / "seg.nii.gz", m.astype(np.uint8), spacing=(0.9, 0.9, 1.0))
        soft = np.where(m > 0, 0.8, 0.2).astype(np.float32)  # a "sigmoid map"
        write_nifti(pred / f"{i:05d}" / "seg.nii.gz", soft, spacing=(0.9, 0.9, 1.0))
    r = cli("eval", "seg", "--pred", pred, "--ref", ref, "--json", "--min", "dice=0.99")
    assert r.code == 0, r.err
    got = {x["name"]: x for x in _json(r.out)}
    assert "thresholded" in r.err  # never evaluated as a soft map
    assert got["dice"]["value"] == 1.0 and got["dice_pooled"]["value"] == 1.0 and got["hd95"]["value"] == 0.0
    assert got["lesion_dice"]["value"] == 1.0 and got["lesion_dice"]["n"] >= 1
    assert {"lesion_dice_tiny", "lesion_dice_small", "lesion_dice_medium", "lesion_dice_large"} <= set(got)
    r = cli("eval", "bins", "--gen", pred, "--ref", ref, "--json")
    assert r.code == 0, r.err
    b = {x["name"]: x["value"] for x in _json(r.out)}
    assert b["bins_exact"] == 1.0 and b["bins_mae"] == 0.0 and b["bins_presence"] == 1.0


def test_bins_from_sample_records_and_ssim(cli, phantom_root, tmp_path):
    gen = _sample_folder(phantom_root, tmp_path / "gen")
    r = cli("eval", "ssim", "--gen", gen, "--ref", tmp_path / "gen", "--json")
    assert r.code == 0, r.err
    s = {x["name"]: x["value"] for x in _json(r.out)}
    assert s["ssim"] == pytest.approx(1.0) and s["ssim-3d"] == pytest.approx(1.0)


def test_eval_process_imports_neither_torchvision_nor_nibabel(tmp_path, offline_caches):  # noqa: F811
    """`medgen eval fid|kid` start-up: no torchvision (our ResNet50), no nibabel (the reader parses NIfTI-1
    itself), no MONAI or SciPy; the CLI runs in a fresh process, as users run it. (KID here: FID's two
    2048² eigendecompositions take ~15 s on two CPU cores; the path up to them is the same.)"""
    import subprocess
    import sys

    import torch

    from medgen_cli.metrics import features, nets

    ck = offline_caches / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(nets.ResNet50().state_dict(), ck / features.RESNET50_FILE)
    rng = np.random.default_rng(0)
    for name in ("gen/0", "ref/a", "ref/b"):
        write_nifti(tmp_path / name / "bravo.nii.gz", rng.random((32, 32, 2)).astype(np.float32))
    code = ("import json, sys\n"
            "from medgen_cli.cli.app import run\n"
            f"rc = run(['eval', 'kid', '--protocol', 'reference', '--gen', {str(tmp_path / 'gen')!r}, "
            f"'--ref', {str(tmp_path / 'ref')!r}, "
            "'--json', '--device', 'cpu', '--workers', '1'])\n"
            "heavy = [m for m in ('torchvision', 'nibabel', 'monai', 'scipy') if m in sys.modules]\n"
            "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = json.loads(p.stderr.strip().splitlines()[-1])
    assert last == {"rc": 0, "heavy": []}, p.stderr[-2000:]
    rec = _json(p.stdout)[0]
    assert rec["name"] == "kid" and rec["n_gen_slices"] == 2 and rec["n_ref_slices"] == 4
    assert rec["ref_cache_hit"] is False
