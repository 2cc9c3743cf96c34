"""Training: exact resume (2D and 3D), SIGTERM saves and exits 130, SIGKILL loses nothing saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medgen_cli import checkpoint as ckpt


def tensors_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    step_dir = ckpt.resolve_step_dir(run, "latest")
    return {g: ckpt.load_group(step_dir, g) for g in ckpt.available_groups(step_dir)}


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for group in ta:
        assert ta[group].keys() == tb[group].keys(), group
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), f"{group}/{k} differs"


def train(cli, preset, root, run, *extra):
    """Exactness is promised on the CPU (GPU kernels may reduce in another order): pin the device."""
    return cli("train", "--preset", preset, "--data", root, "--run-dir", run, "--device", "cpu", *extra)


@pytest.mark.parametrize("dims", [2, 3])
def test_resume_is_bit_identical(cli, tiny_preset, phantom_root, tmp_path, dims):
    preset = tiny_preset(dims, extra="\n[train.ema]\nenabled = true\nstart_step = 1\nevery = 1\n")
    n = 6
    assert train(cli, preset, phantom_root, tmp_path / "full", "--max-steps", n).code == 0
    assert train(cli, preset, phantom_root, tmp_path / "half", "--max-steps", n // 2).code == 0
    r = cli("train", "--resume", "--run-dir", tmp_path / "half", "--max-steps", n, "--device", "cpu")
    assert r.code == 0, r.err
    assert json.loads((ckpt.resolve_step_dir(tmp_path / "half", "latest") / "trainer_state.json").read_text())[
        "step"] == n
    assert_identical(tmp_path / "full", tmp_path / "half")


def test_run_folder_contents(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    r = train(cli, tiny_preset(2), phantom_root, run, "--json")
    assert r.code == 0, r.err
    rec = json.loads(r.out.strip().splitlines()[-1])
    assert rec["kind"] == "checkpoint" and rec["schema"] == "medgen/1" and rec["run"] == str(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["provenance"]["files"][0]["sha256"] and cfg["preset"]["train"]["epochs"] == 2
    assert Path(cfg["preset"]["data"]["root"]).is_absolute()  # later stages resolve it from anywhere
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2 and "train" in kinds
    assert list((run / "tb").iterdir()) and sorted(p.name for p in (run / "previews").iterdir())
    assert (run / "ckpt" / "BEST").is_file() and (run / "ckpt" / "LATEST").is_file()


def _spawn(args: list, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "medgen_cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (run / "ckpt" / "LATEST").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_then_resume_matches_uninterrupted(cli, tiny_preset, phantom_root, tmp_path, sig):
    """SIGTERM: saves, exits 130, state 'interrupted'. SIGKILL: the last checkpoint is intact.
    Either way resuming to N steps gives the uninterrupted run's weights bit for bit."""
    preset = tiny_preset(2, extra="\n[train.ema]\nenabled = true\nstart_step = 2\nevery = 1\n")
    n = 60
    long = ["--set", "train.epochs=1000", "--set", "train.ckpt_every_steps=2", "--set", "train.val_every=5",
            "--set", "train.preview_every=0", "--set", "train.log_every=20", "--max-steps", n]
    run = tmp_path / "killed"
    proc = _spawn(["train", "--preset", preset, "--data", phantom_root, "--run-dir", run, "--device", "cpu", *long],
                  tmp_path)
    _wait_for_checkpoint(run, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert "error: training stopped by SIGTERM" in err and "Traceback" not in err
        assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    r = cli("train", "--resume", "--run-dir", run, "--max-steps", n, "--device", "cpu")
    assert r.code == 0, r.err
    assert train(cli, preset, phantom_root, tmp_path / "full", *long).code == 0
    assert_identical(tmp_path / "full", run)


def test_loader_workers_do_not_change_the_result(cli, tiny_preset, phantom_root, tmp_path):
    """Worker processes read ahead across epoch ends; per-epoch augmentation draws must not notice."""
    preset = tiny_preset(2)
    sets = ["--set", "data.augment=dynamic", "--set", "train.preview_every=0"]  # 2 epochs of ~10 steps
    assert train(cli, preset, phantom_root, tmp_path / "w0", *sets).code == 0
    r = train(cli, preset, phantom_root, tmp_path / "w2", *sets, "--set", "data.num_workers=2")
    assert r.code == 0, r.err
    assert_identical(tmp_path / "w0", tmp_path / "w2")
    state = json.loads((ckpt.resolve_step_dir(tmp_path / "w2", "latest") / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] > 2


def test_stop_at_an_epoch_end_then_resume_matches_uninterrupted(tiny_preset, tmp_path):
    """Stopped after an epoch's last step (saved before the epoch-end validation), a resumed run first
    finishes that epoch's end, then trains on: the weights equal an uninterrupted run's."""
    from conftest import RandomPairs

    from medgen_cli.config import load
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.errors import Interrupted
    from medgen_cli.jobs import build

    p = load(str(tiny_preset(2)), ["train.preview_every=0"]).preset  # 2 epochs of 16 / 4 = 4 steps

    def trainer(run):
        run.mkdir(exist_ok=True)
        return Trainer(build.build_model(p), build.build_strategy(p), RandomPairs(n=16), RandomPairs(n=16), p.train,
                       run, "{}", torch.device("cpu"))

    class StopAt:
        def __init__(self, tr, step):
            self.tr, self.step = tr, step

        @property
        def requested(self):
            return "SIGTERM" if self.tr.state.step >= self.step else None

    full = trainer(tmp_path / "full")
    full.fit(StopAt(full, 10**9))
    cut = trainer(tmp_path / "cut")
    with pytest.raises(Interrupted):
        cut.fit(StopAt(cut, cut.steps_per_epoch))
    assert (cut.state.epoch, cut.state.pos) == (0, cut.steps_per_epoch)
    again = trainer(tmp_path / "cut")
    again.resume(ckpt.resolve_step_dir(tmp_path / "cut", "latest"))
    again.fit(StopAt(again, 10**9))
    assert (again.state.epoch, again.state.step) == (full.state.epoch, full.state.step) == (2, 8)
    assert_identical(tmp_path / "full", tmp_path / "cut")
    vals = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in vals if v["kind"] == "val"] == [1, 2], "epoch 0's end validated once, on resume"
