"""`medgen train` and `medgen presets`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, DryRunOpt, JsonOpt, PresetOpt, SetOpt, emit


def train(
    preset: PresetOpt = None,
    data: DataOpt = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        "--run-dir", help="Run folder (default runs/<preset>-<YYYYmmdd-HHMMSS>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir.")] = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Cap on optimizer steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training length in epochs.")] = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    nodes: Annotated[Optional[int], typer.Option(
        "--nodes", help="With --dry-run: print torchrun and SLURM launch lines for this many nodes.")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(
        "--gpus-per-node", help="With --dry-run: GPUs (processes) per node for the launch lines and the plan.")] = None,
    gpu_mem: Annotated[Optional[str], typer.Option(
        "--gpu-mem", help="With --dry-run: plan memory for a GPU of this size (e.g. 80GiB; default this GPU).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a diffusion model from a preset; checkpoints land in the run folder."""
    from ..jobs import train as job

    flags = {"data.root": str(data) if data else None, "train.max_steps": max_steps,
             "train.epochs": epochs, "train.device": device}
    for rec, human in job.run(preset, set_ or [], flags, run_dir, resume, dry_run, nodes, gpus_per_node, gpu_mem):
        emit(rec, human, as_json)


def presets(as_json: JsonOpt = False) -> None:
    """List the shipped presets and the experiment each reproduces."""
    import json

    from ..config import load, shipped_names

    for name in shipped_names():
        p = load(name).preset
        if as_json:
            print(json.dumps({"name": name, "experiment": p.experiment, "description": p.description}))
        else:
            print(f"{name:<22} {p.experiment or '-':<20} {p.description}")
