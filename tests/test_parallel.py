"""FSDP (engine/parallel.py) and multi-node launch lines (jobs/launch.py).

FSDP: two gloo processes on the CPU shard a tiny UNet; training 2 steps, stopping, resuming to 4 gives
the weights (and EMA) of one process training 4 steps with the same global batch, and the checkpoints
hold whole tensors. Launch lines are tested as text (there is no cluster here).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
import torch

from medgen_cli import checkpoint as ckpt
from medgen_cli.engine.parallel import Parallel
from medgen_cli.jobs import build, launch

EMA = "\n[train.ema]\nenabled = true\nstart_step = 1\nevery = 1\n"

DRIVER = """
import sys
from medgen_cli.cli.app import run

args = sys.argv[1:]
cut = args.index("--then")
code = run(args[:cut])
sys.exit(code or run(args[cut + 1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preset_of(run):
    from medgen_cli.config import validate

    return validate(json.loads((run / "config.json").read_text())["preset"])


def test_fsdp_two_processes_resume_equal_one(cli, tiny_preset, phantom_root, tmp_path):
    preset = tiny_preset(2, extra=EMA)
    # gloo: FSDP2 runs on the CPU. 2 steps per epoch: the first segment ends an epoch (validation, preview and
    # checkpoint on gathered weights) and stops mid-epoch at step 3 (the final validation); the second ends epoch 2.
    common = ["--preset", preset, "--data", phantom_root, "--device", "cpu", "--set", "train.batch_size=16"]
    run_dir = tmp_path / "fsdp"
    first = ["train", *common, "--max-steps", 3, "--set", "train.parallel=fsdp", "--run-dir", run_dir]
    second = ["train", *common, "--max-steps", 4, "--resume", "--run-dir", run_dir]
    (tmp_path / "driver.py").write_text(DRIVER)
    # the two ranks started directly with torchrun's environment (no launcher process to import torch)
    cmd = [sys.executable, str(tmp_path / "driver.py"), *map(str, first), "--then", *map(str, second)]
    port = str(_free_port())
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert len(outs[0][0].strip().splitlines()) == 2 and not outs[1][0].strip(), "rank 0 reports each segment"
    assert _preset_of(run_dir).train.parallel == "fsdp"
    assert len(list((run_dir / "previews").glob("*.png"))) == 2, "rank 0 previewed on the gathered weights"
    assert len([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"val"' in x]) == 3, "validations at steps 2, 3 and 4"
    one = cli("train", *common, "--max-steps", 4, "--run-dir", tmp_path / "one")
    assert one.code == 0, one.err
    a, b = (ckpt.resolve_step_dir(tmp_path / d, "latest") for d in ("fsdp", "one"))
    assert a.name == b.name == "step-00000004"
    w0 = build.build_model(_preset_of(tmp_path / "one")).state_dict()
    for group in ("model", "ema"):
        ga, gb = ckpt.load_group(a, group), ckpt.load_group(b, group)
        assert {k: v.shape for k, v in ga.items()} == {k: v.shape for k, v in gb.items()}, "whole tensors"
        # as tests/test_ddp.py: relative to the whole update (AdamW amplifies reduction-order noise)
        diff = sum(((ga[k] - gb[k]) ** 2).sum() for k in ga).sqrt()
        update = sum(((gb[k] - w0[k]) ** 2).sum() for k in gb).sqrt()
        assert diff / update < 1e-3, (group, float(diff / update))
    sa, sb = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 4


def test_fsdp_needs_several_processes(cli, tiny_preset, phantom_root, tmp_path):
    args = ["train", "--preset", tiny_preset(), "--data", phantom_root, "--set", "train.parallel=fsdp"]
    r = cli(*args, "--run-dir", tmp_path / "r")
    assert r.code == 3 and "train.parallel='fsdp'" in r.err and "hint:" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "r").exists(), "refused before the run folder is written"
    r = cli(*args, "--dry-run")
    assert r.code == 3 and "world of one" in r.err
    assert cli(*args, "--dry-run", "--gpus-per-node", 2).code == 0, "planning two GPUs is fine"
    bad = cli("train", "--preset", tiny_preset(), "--data", phantom_root, "--set", "train.parallel=zero3", "--dry-run")
    assert bad.code == 3 and "train.parallel" in bad.err


# ---------------------------------------------------------------------------------- launch lines


def test_launch_lines_text(cli, tiny_preset, phantom_root, tmp_path):
    preset = tiny_preset(2)
    run_dir = tmp_path / "runs" / "big"
    r = cli("train", "--preset", preset, "--data", phantom_root, "--set", "train.batch_size=8", "--set",
            "train.lr=2e-4", "--max-steps", 10, "--run-dir", run_dir, "--dry-run", "--nodes", 2,
            "--gpus-per-node", 4, "--json")
    assert r.code == 0, r.err
    rec = json.loads(r.out)
    lines = rec["launch"]
    assert (lines["nodes"], lines["gpus_per_node"], lines["world"]) == (2, 4, 8)
    tr = lines["torchrun"]
    assert tr.startswith("torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d "
                         '--rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id big -m medgen_cli train ')
    words = shlex.split(tr.split(" -m medgen_cli ", 1)[1])
    assert words[:3] == ["train", "--preset", str(preset)]
    assert words[words.index("--data") + 1] == str(phantom_root.resolve())
    assert words[words.index("--run-dir") + 1] == str(run_dir.resolve())
    assert [words[i + 1] for i, w in enumerate(words) if w == "--set"] == ["train.batch_size=8", "train.lr=2e-4"]
    assert words[words.index("--max-steps") + 1] == "10"
    sb = lines["sbatch"].splitlines()
    assert sb[0] == "#!/bin/bash"
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR1@300"):
        assert want in sb
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in sb
    srun = [x for x in sb if x.startswith("srun ")]
    assert len(srun) == 1
    inner = shlex.split(srun[0])[-1]
    assert inner.startswith("RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec python -m "
                            "medgen_cli train --preset") and inner.endswith(" $RESUME")
    assert any(x.startswith("RESUME=$([ -f ") and "config.json" in x for x in sb)
    assert rec["memory"]["world"] == 8 and rec["memory"]["local_batch"] == 1 and rec["memory"]["parallel"] == "ddp"
    assert not run_dir.exists(), "--dry-run writes nothing"
    human = cli("train", "--preset", preset, "--data", phantom_root, "--set", "train.batch_size=4", "--dry-run",
                "--gpus-per-node", 4, "--run-dir", run_dir)
    assert human.code == 0, human.err
    assert "torchrun --standalone --nnodes 1 --nproc-per-node 4 -m medgen_cli train" in human.out
    assert "# memory: peak" in human.out and "DDP x4" in human.out


def test_launch_functions():
    args = launch.train_args("3d-pixel-256", "/data/brain mets", ["model.channels=[16, 32]"],
                             {"train.max_steps": None, "train.epochs": 3}, "/runs/r1")
    assert args == ["train", "--preset", "3d-pixel-256", "--data", "/data/brain mets", "--set",
                    "model.channels=[16, 32]", "--epochs", "3", "--run-dir", "/runs/r1"]
    line = launch.torchrun_line(3, 8, args, "r1")
    assert "--nnodes 3 --nproc-per-node 8" in line and "'/data/brain mets'" in line
    assert "'model.channels=[16, 32]'" in line
    script = launch.sbatch_script(3, 8, args, "/runs/r1", "medgen-r1")
    assert "#SBATCH --job-name=medgen-r1" in script and "[ -f /runs/r1/config.json ]" in script


def test_launch_option_errors(cli, tiny_preset, phantom_root, tmp_path):
    base = ["train", "--preset", tiny_preset(2), "--data", phantom_root]
    cases = [
        ([*base, "--nodes", 2, "--gpus-per-node", 2, "--run-dir", tmp_path / "a"], 2, "--dry-run"),
        ([*base, "--nodes", 0, "--dry-run"], 2, "--nodes must be at least 1"),
        ([*base, "--gpus-per-node", -1, "--dry-run"], 2, "--gpus-per-node must be at least 1"),
        ([*base, "--nodes", 3, "--dry-run"], 3, "does not split over 3 processes"),
        ([*base, "--gpu-mem", "lots", "--dry-run"], 2, "memory size"),
        ([*base, "--gpu-mem", "80GiB", "--run-dir", tmp_path / "b"], 2, "--gpu-mem"),
    ]
    for args, code, phrase in cases:
        r = cli(*args)
        assert r.code == code, (args, r.err)
        lines = r.err.strip().splitlines()
        assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), r.err
        assert phrase in r.err and "Traceback" not in r.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_collective_over_mixed_layouts_writes_every_tensor_back():
    """"allreduce" flattens gradients in memory order (channels-last ones included, no reordering copy) and
    writes the collective's result back into every tensor; any other layout is refused."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(4, 3, 2, 2, 2, generator=g).contiguous(memory_format=torch.channels_last_3d),
          torch.randn(5, generator=g), torch.tensor(2.0), torch.randn(2, 3, 4, 4, generator=g).contiguous(
              memory_format=torch.channels_last), torch.randn(2, 2, generator=g, dtype=torch.float64)]
    seen = []
    want = [t * 2 + 1 for t in ts]
    Parallel._all(ts, lambda flat: seen.append(flat.dtype) or flat.mul_(2).add_(1))
    assert sorted(map(str, seen)) == ["torch.float32", "torch.float64"]  # one collective per dtype
    for t, w in zip(ts, want):
        assert torch.equal(t, w)
    assert ts[0].is_contiguous(memory_format=torch.channels_last_3d) and ts[3].is_contiguous(
        memory_format=torch.channels_last)
    for odd in (torch.randn(4, 4)[:, :2], torch.randn(3, 4).t()):
        with pytest.raises(ValueError, match="neither contiguous nor channels-last"):
            Parallel._all([odd], lambda flat: None)
