"""The command line: bad input gets one error line, a hint, its exit code, and nothing is lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def assert_error(r, code: int, *phrases: str) -> None:
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert any(line.startswith("error: ") for line in lines), r.err
    assert any(line.startswith("hint: ") for line in lines), r.err
    assert "Traceback" not in r.err
    for p in phrases:
        assert p in r.err, r.err


def test_help_and_completion_never_import_torch():
    code = ("import sys; from medgen_cli.cli.app import run; rc = run(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout, out.stderr
    env = {"COMP_WORDS": "medgen train --preset 3d-pixel-1", "COMP_CWORD": "3",
           "_MEDGEN_COMPLETE": "complete_bash", "PATH": "/usr/bin:/bin"}
    code = "import sys; from medgen_cli.cli.app import run; run(); "
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "3d-pixel-128" in out.stdout and "3d-pixel-128-ema" in out.stdout, out.stderr


def test_completion_scripts_are_current():
    from medgen_cli.cli.completions import SHELLS, script

    for shell, name in SHELLS.items():
        assert (ROOT / "completions" / name).read_text() == script(shell), (
            f"completions/{name} is stale: run python -m medgen_cli.cli.completions completions")


@pytest.fixture
def broken(phantom_root, tmp_path):
    """A writable copy of the phantom dataset to break on purpose."""
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


def _rewrite(path: Path, fn) -> None:
    img = nib.load(str(path))
    arr = fn(np.asarray(img.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))


def test_unknown_preset_key_and_type(cli, phantom_root, tmp_path):
    assert_error(cli("train", "--preset", "2d-pixle-128", "--data", phantom_root), 3, "did you mean '2d-pixel-128'")
    r = cli("train", "--preset", "2d-pixel-128", "--data", phantom_root, "--set", "train.lrr=1",
            "--set", "train.epochs=many", "--dry-run")
    assert_error(r, 3, "train.lrr: unknown key; did you mean 'lr'?", "train.epochs:")


def test_dry_run_prints_config_and_writes_nothing(cli, tiny_preset, phantom_root, tmp_path):
    r = cli("train", "--preset", tiny_preset(3), "--data", phantom_root, "--run-dir", tmp_path / "r", "--dry-run")
    assert r.code == 0, r.err
    assert '"parameters"' in r.out and not (tmp_path / "r").exists()


def test_existing_run_folder_without_resume(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    assert_error(cli("train", "--preset", tiny_preset(), "--data", phantom_root, "--run-dir", run), 2, "--resume")
    assert (run / "notes.txt").read_text() == "keep me" and len(list(run.iterdir())) == 1


@pytest.mark.parametrize("breakage, phrase", [
    ("missing_modality", "seg.nii.gz"),
    ("shapes", "shape"),
    ("three_valued_mask", "seg.nii.gz"),
    ("nan", "NaN"),
    ("empty_split", "val"),
])
def test_bad_dataset_is_refused(cli, tiny_preset, broken, tmp_path, breakage, phrase):
    patient = sorted((broken / "train").iterdir())[0]
    if breakage == "missing_modality":
        (patient / "seg.nii.gz").unlink()
    elif breakage == "shapes":
        _rewrite(patient / "bravo.nii.gz", lambda a: a[:-2])
    elif breakage == "three_valued_mask":
        _rewrite(patient / "seg.nii.gz", lambda a: np.where(a > 0, 1.0, 0.0) + (np.arange(a.size).reshape(a.shape) % 7 == 0) * 2)
    elif breakage == "nan":
        _rewrite(patient / "bravo.nii.gz", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a))
    else:
        for p in (broken / "val").iterdir():
            shutil.rmtree(p)
    r = cli("train", "--preset", tiny_preset(), "--data", broken, "--run-dir", tmp_path / "run")
    assert_error(r, 4, phrase)
    check = cli("data", "check", broken)
    assert check.code == 4 and phrase in check.out + check.err


def test_sample_errors(cli, tiny_preset, phantom_root, tmp_path):
    empty_run = tmp_path / "norun"
    empty_run.mkdir()
    assert_error(cli("sample", "--run", empty_run, "--out", tmp_path / "s"), 4, "no checkpoint")
    run = tmp_path / "run"
    assert cli("train", "--preset", tiny_preset(), "--data", phantom_root, "--run-dir", run,
               "--max-steps", 1).code == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_error(cli("sample", "--run", run, "--out", afile), 4, "is a file")
    assert afile.read_text() == "x"
    assert_error(cli("sample", "--run", run, "--solver", "eulr", "--out", tmp_path / "s2"), 2, "euler")


def test_data_synth_refuses_to_overwrite(cli, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    r = cli("data", "synth", out, "--size", 16, "--depth", 8, "--train", 1, "--val", 1, "--test", 1)
    assert_error(r, 4)
    assert (out / "mine.txt").read_text() == "precious"
