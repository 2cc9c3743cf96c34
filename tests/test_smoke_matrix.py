"""Every mode, backbone and space trains a step, checkpoints, resumes to a second step and samples.

One grouped matrix (the presets issue's smoke run), toy sizes, 2D and 3D. Mode-specific behaviour is tested
in test_modes.py, test_models_dit.py, test_spaces.py; this only proves the whole path holds together.
"""

from __future__ import annotations

import json

import pytest

DIT = ["--set", "model={kind=\"dit\", variant=\"S\", patch_size=2, hidden_size=32, depth=2, num_heads=2}"]
CASES = {
    # name: (dims, mode, extra --set args, sample args)
    "2d-bravo-unet": (2, "bravo", [], []),
    "2d-seg-unet": (2, "seg", ["--set", "data.image_size=32"], []),
    "2d-dual-unet": (2, "dual", [], []),
    "2d-multi-unet": (2, "multi", [], ["--modality", "flair"]),
    "2d-segcond-unet": (2, "seg_conditioned", ["--set", "data.image_size=32"], ["--bins", "0,1,0,0,0,0,0"]),
    "2d-seginput-unet": (2, "seg_conditioned_input", ["--set", "data.image_size=32"], ["--bins", "0,1,0,0,0,0,0"]),
    "2d-bravo-dit": (2, "bravo", DIT, []),
    "2d-bravo-s2d": (2, "bravo", ["--set", "space.kind=\"s2d\""], []),
    "3d-bravo-unet": (3, "bravo", [], []),
    "3d-seg-unet": (3, "seg", [], []),
    "3d-dual-unet": (3, "dual", [], []),
    "3d-segcond-unet": (3, "seg_conditioned", [], ["--bins", "0,1,0,0,0,0,0"]),
    "3d-bravo-dit": (3, "bravo", DIT, []),
    "3d-bravo-wavelet": (3, "bravo", ["--set", "space.kind=\"wavelet\""], []),
    "3d-bravo-s2d": (3, "bravo", ["--set", "space.kind=\"s2d\""], []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_resume_sample(cli, tiny_preset, phantom_root, tmp_path, name):
    dims, mode, extra, sample_args = CASES[name]
    run = tmp_path / "run"
    common = ["--set", "train.preview_every=0", "--set", "train.val_max_items=1", "--device", "cpu", *extra]
    r = cli("train", "--preset", tiny_preset(dims, mode), "--data", phantom_root, "--run-dir", run,
            "--max-steps", 1, *common)
    assert r.code == 0, r.err
    r = cli("train", "--resume", "--run-dir", run, "--max-steps", 2, "--device", "cpu")
    assert r.code == 0, r.err
    latest = (run / "ckpt" / "LATEST").read_text().strip()
    assert json.loads((run / "ckpt" / latest / "trainer_state.json").read_text())["step"] == 2
    r = cli("sample", "--run", run, "--out", tmp_path / "s", "--n", 1, "--steps", 2, "--json", *sample_args)
    assert r.code == 0, r.err
    recs = [json.loads(x) for x in r.out.splitlines()]
    assert recs and all(x["kind"] == "sample" and x["nfe"] == 2 for x in recs)
