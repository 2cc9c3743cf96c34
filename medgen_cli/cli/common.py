"""What every command shares: option aliases, the output sink, logging. Imports no torch.

stdout carries data only (a path per line, or one JSON record per line with --json); logs,
progress and warnings go to stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import records


def complete_presets(incomplete: str) -> list[str]:
    from ..config import shipped_names

    return [n for n in shipped_names() if n.startswith(incomplete)]


PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="Shipped preset name or a PATH.toml.", autocompletion=complete_presets)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a preset key: section.key=value (TOML literal). Repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON record per line on stdout.")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Validate, print the resolved configuration and exit without side effects.")]
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", help="Dataset root in the BrainMetShare layout (overrides data.root).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]


def emit(record: dict, human: str | None, as_json: bool) -> None:
    """Write one result: a JSON record with --json, else a human line (skipped when None)."""
    if as_json:
        records.write(record)
    elif human is not None:
        sys.stdout.write(human + "\n")
        sys.stdout.flush()


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (not the one at set-up), so
    in-process runs (tests, notebooks) that swap stderr still see the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: bool = False) -> None:
    log = logging.getLogger("medgen")
    if log.handlers:
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
