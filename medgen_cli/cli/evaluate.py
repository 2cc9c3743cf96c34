"""`medgen eval <metric>`: image metrics on paired data, or one-step x0 reconstructions of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, JsonOpt, emit

app = typer.Typer(help="Evaluate samples or runs; emits metric records.", no_args_is_help=True)

GenOpt = Annotated[Optional[str], typer.Option(
    "--gen", help="Generated samples: a folder, or '-' for sample records on stdin.")]
RefOpt = Annotated[Optional[Path], typer.Option("--ref", help="Reference folder paired with --gen.")]
RunOpt = Annotated[Optional[Path], typer.Option(
    "--run", help="Run (or step folder): one-step x0 reconstructions on --split (SYSTEM.md §9).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split for --run (default: preset's).")]
MaxOpt = Annotated[Optional[list[str]], typer.Option("--max", help="Fail (exit 6) if name > value.")]
MinOpt = Annotated[Optional[list[str]], typer.Option("--min", help="Fail (exit 6) if name < value.")]
ItemsOpt = Annotated[Optional[int], typer.Option("--max-items", help="Evaluate at most this many items.")]


def _metric(name: str):
    def command(gen: GenOpt = None, ref: RefOpt = None, run: RunOpt = None, split: SplitOpt = None,
                data: DataOpt = None, max_items: ItemsOpt = None, max_: MaxOpt = None,
                min_: MinOpt = None, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
        from ..jobs import evaluate as job

        results = job.run(name, gen=gen, ref=ref, run=run, split=split, data=data,
                          max_items=max_items, device=device)
        for rec, human in results:
            emit(rec, human, as_json)
        job.check_thresholds([r for r, _ in results], max_ or [], min_ or [])

    command.__doc__ = {"psnr": "PSNR in dB on [0,1] (per sample, capped at 100 dB, averaged).",
                       "msssim": "MS-SSIM (2D; slice-wise and volumetric for 3D volumes)."}[name]
    return command


app.command("psnr")(_metric("psnr"))
app.command("msssim")(_metric("msssim"))
