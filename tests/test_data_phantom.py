"""Synthetic patients and datasets (data/phantom.py) and the data jobs (jobs/data.py)."""

import time

import numpy as np
import pytest

from medgen_cli.data import layout, nifti, phantom, sizebins
from medgen_cli.errors import InputError, UsageError
from medgen_cli.jobs import data as jobs

L = phantom.LABELS


def test_same_seed_same_patient_other_seed_differs():
    a = phantom.synth_patient(5, size=32, depth=16)
    b = phantom.synth_patient(5, size=32, depth=16)
    c = phantom.synth_patient(6, size=32, depth=16)
    for m in layout.IMAGE_MODALITIES:
        np.testing.assert_array_equal(a[0][m], b[0][m])
        assert not np.array_equal(a[0][m], c[0][m])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])


def test_shapes_dtypes_and_seg_is_core_or_rim():
    vols, seg, labels = phantom.synth_patient(4, size=48, depth=20)
    assert seg.shape == labels.shape == (48, 48, 20) and seg.dtype == labels.dtype == np.uint8
    assert all(v.shape == (48, 48, 20) and v.dtype == np.float32 and v.min() >= 0 for v in vols.values())
    np.testing.assert_array_equal(seg, np.isin(labels, [L["rim"], L["core"]]))
    assert not vols["bravo"][labels == 0].any()  # skull-stripped-like background


def test_contrast_relations_per_tissue():
    vols, _, labels = phantom.synth_patient(4, size=64, depth=32, index=4)  # 5 tumours
    mean = {m: {name: float(v[labels == k].mean()) for name, k in L.items() if (labels == k).any()}
            for m, v in vols.items()}
    assert set(mean["bravo"]) == set(L)  # every tissue is present
    for m in ("bravo", "t1_gd"):
        assert mean[m]["rim"] > 1.3 * mean[m]["brain"]  # enhancement
    assert mean["t1_pre"]["rim"] < mean["t1_pre"]["brain"]  # no enhancement before contrast
    assert mean["flair"]["oedema"] > 1.3 * mean["flair"]["brain"]
    for m in ("bravo", "t1_pre", "t1_gd"):
        assert mean[m]["oedema"] < mean[m]["brain"]
        assert mean[m]["csf"] < 0.5 * mean[m]["brain"]
    assert mean["flair"]["csf"] < 0.5 * mean["flair"]["brain"]  # fluid suppressed
    assert 1000 < vols["bravo"].max() < 20000


def test_small_patient_is_fast():
    phantom.synth_patient(0, size=64, depth=32)
    t = time.perf_counter()
    phantom.synth_patient(1, size=64, depth=32)
    assert time.perf_counter() - t < 1.0


def test_dataset_layout_affine_and_all_size_bins(tmp_path):
    out = jobs.synth(tmp_path / "ds", n_train=4, n_val=1, n_test=1, size=64, depth=32, seed=0)
    assert [p.name for p in layout.patients(out, "all")] == [f"Phantom_{k:03d}" for k in range(1, 7)]
    assert [p.name for p in layout.patients(out, "val")] == ["Phantom_005"]
    assert jobs.check(out) == []
    _, spacing, affine = nifti.read_image(out / "train" / "Phantom_001" / "bravo.nii.gz")
    assert spacing == pytest.approx((3.75, 3.75, 1.0))
    np.testing.assert_allclose(affine, np.diag([3.75, 3.75, 1.0, 1.0]))
    bins = np.zeros(7, int)
    for p in layout.patients(out, "all"):
        seg = nifti.to_dhw(nifti.read_mask(p / "seg.nii.gz"))  # (D, H, W)
        bins += sizebins.size_bins(seg, (1.0, 3.75, 3.75))
    assert (bins > 0).all(), bins


def test_synth_refuses_non_empty_folder_and_overwrite_replaces_splits(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError) as exc:
        jobs.synth(out, 1, 1, 1, size=16, depth=8)
    assert exc.value.where == str(out) and "--overwrite" in exc.value.hint
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "train" / "Old_001").mkdir(parents=True)
    jobs.synth(out, 1, 0, 1, size=16, depth=8, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "test_new", "train"]
    assert [p.name for p in (out / "train").iterdir()] == ["Phantom_001"]


def test_synth_job_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="size"):
        jobs.synth(tmp_path / "x", size=4)
    with pytest.raises(UsageError):
        jobs.synth(tmp_path / "x", n_train=-1)
    assert not (tmp_path / "x").exists()


def test_report_check_prints_findings_and_fails_on_errors(tmp_path, capsys):
    import json

    out = jobs.synth(tmp_path / "ds", 1, 1, 1, size=16, depth=8)
    assert jobs.report_check(out) == [] and capsys.readouterr().out == ""
    (out / "val" / "Phantom_002" / "flair.nii.gz").unlink()
    with pytest.raises(InputError) as exc:
        jobs.report_check(out, as_json=True)
    assert exc.value.code == 4 and "missing modality" in exc.value.what
    rec = json.loads(capsys.readouterr().out)
    assert rec["schema"] == "medgen/1" and rec["kind"] == "problem" and rec["severity"] == "error"
    assert rec["path"].endswith("flair.nii.gz") and rec["hint"]
