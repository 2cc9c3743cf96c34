"""`medgen report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOpt


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or folders holding runs).")],
    as_json: JsonOpt = False,
) -> None:
    """Print a Markdown table: run, preset, state, epochs/steps, best val loss, eval metrics."""
    from ..jobs import report as job

    print(job.render(runs, as_json=as_json), end="")
