"""Data parallel: two gloo processes on the CPU train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from medgen_cli import checkpoint as ckpt
from medgen_cli.jobs import build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "allreduce"])
def test_two_processes_equal_one(cli, tiny_preset, phantom_root, tmp_path, parallel):
    """DDP's wrapper and "allreduce" (one all-reduce after the backward: what ddp becomes for CUDA-graph
    steps), each against one process."""
    preset = tiny_preset(2, extra="\n[train.ema]\nenabled = true\nstart_step = 1\nevery = 1\n")
    args = ["train", "--preset", preset, "--data", phantom_root, "--max-steps", 4, "--set", "train.preview_every=0",
            "--device", "cpu", "--set", f"train.parallel='{parallel}'"]  # the gloo test; NCCL needs a GPU per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "medgen_cli", *map(str, args), "--run-dir", tmp_path / "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()) == 1, "only rank 0 reports"
    assert cli(*args, "--run-dir", tmp_path / "one").code == 0
    # the first step's gradient norm (before any update): the averaged gradient is the one-process gradient,
    # within 1e-6 (issue 6; measured: equal)
    norms = [next(json.loads(line)["grad_norm"] for line in (tmp_path / d / "metrics.jsonl").open()
                  if '"train"' in line) for d in ("ddp", "one")]
    assert abs(norms[0] - norms[1]) <= 1e-6 * norms[1], norms
    a, b = (ckpt.resolve_step_dir(tmp_path / d, "latest") for d in ("ddp", "one"))
    # Gradients agree up to reduction order; AdamW's g/sqrt(v) turns the order noise of near-zero
    # gradients into updates of size ~lr, so weights are compared relative to the whole update.
    # A data-parallel bug (ranks drawing the same samples or noise) makes this O(1).
    preset_obj = _preset(tmp_path / "one")
    w0 = build.build_model(preset_obj).state_dict()
    for group in ("model", "ema"):
        ga, gb = ckpt.load_group(a, group), ckpt.load_group(b, group)
        diff = sum(((ga[k] - gb[k]) ** 2).sum() for k in ga).sqrt()
        update = sum(((gb[k] - w0[k]) ** 2).sum() for k in gb).sqrt()
        assert diff / update < 1e-3, (group, float(diff / update))


def _preset(run):
    from medgen_cli.config import validate

    return validate(json.loads((run / "config.json").read_text())["preset"])
