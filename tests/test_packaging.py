"""The wheel ships the presets: a non-editable install finds them through importlib.resources."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_presets_found_by_importlib(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("medgen-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from medgen_cli.config import load, presets_dir, shipped_names; "
            "print(presets_dir()); print(' '.join(shipped_names())); load('3d-pixel-256')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    where, names = out.stdout.splitlines()
    assert Path(where).is_relative_to(site), "presets must come from the installed package"
    expected = sorted(p.stem for p in (ROOT / "presets").glob("*.toml") if p.stem != "INDEX")
    assert names.split() == expected
