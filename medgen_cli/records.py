"""JSON-lines records passed between commands (CONTRACTS.md "Records"). No torch.

Every record carries ``schema``, ``kind`` and ``medgen_version``; ``make`` refuses a record that
misses a required field, so a later stage can rely on them.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Iterable, Iterator

from . import __version__
from .errors import InputError

SCHEMA = "medgen/1"

REQUIRED: dict[str, tuple[str, ...]] = {
    "checkpoint": ("path", "run", "step", "epoch", "weights", "preset"),
    "sample": ("path", "run", "checkpoint", "weights", "seed", "index", "solver", "steps", "nfe", "cfg",
               "condition", "modality", "shape", "spacing", "data_root", "split"),
    "metric": ("name", "value", "ci", "n_gen", "n_ref", "ref", "protocol", "extractor",
               "weights_sha256", "preprocessing", "seed"),
    "error": ("code", "message", "hint"),
    "problem": ("path", "what", "hint", "severity"),  # one finding of `medgen data check`
}


def make(kind: str, **fields) -> dict:
    """Build a record of ``kind``; every required field must be given (None is allowed)."""
    missing = [k for k in REQUIRED[kind] if k not in fields]
    if missing:
        raise ValueError(f"{kind} record lacks {missing}")
    return {"schema": SCHEMA, "kind": kind, "medgen_version": __version__, **fields}


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=False, default=str)


def write(record: dict, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(dumps(record) + "\n")
    stream.flush()


def parse_lines(lines: Iterable[str], where: str = "stdin") -> Iterator[dict]:
    """Records from JSON lines; blank lines are skipped, anything else is an input error."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"line {n} is not a JSON record", where,
                             "pipe the --json output of another medgen command") from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            raise InputError(f"line {n} is not a medgen record (schema {SCHEMA})", where,
                             "pipe the --json output of another medgen command")
        yield rec


def read_file(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(parse_lines(fh, str(path)))
