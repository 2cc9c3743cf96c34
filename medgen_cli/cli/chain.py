"""`medgen chain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, DryRunOpt, JsonOpt, PresetOpt, SetOpt, emit


def chain(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    dir_: Annotated[Optional[Path], typer.Option(
        "--dir", help="Chain folder (default runs/<preset>-chain); rerun to resume it.")] = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a preset's [chain] stages (synth, train, sample, eval, report) as one resumable pipeline."""
    from ..jobs import chain as job

    flags = {"data.root": str(data) if data else None, "train.device": device}
    for rec, human in job.run(preset, set_ or [], flags, dir_, dry_run):
        emit(rec, human, as_json)
