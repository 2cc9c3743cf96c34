"""The `medgen` command: a Typer app whose subcommands import their jobs (and torch) lazily.

Known failures (`MedgenError`) become two lines on stderr and their documented exit code; a usage
mistake exits 2; anything else is a bug: exit 1, traceback only with MEDGEN_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, MedgenError
from . import chain, data, evaluate, report, sample, train

app = typer.Typer(
    name="medgen",
    help="Diffusion models for synthetic brain MRI: train, sample, eval, chain, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,
)
app.command("train")(train.train)
app.command("sample")(sample.sample)
app.add_typer(evaluate.app, name="eval")
app.command("chain")(chain.chain)
app.command("report")(report.report)
app.add_typer(data.app, name="data")
app.command("presets")(train.presets)


def _fail(lines: list[str], code: int) -> int:
    for line in lines:
        sys.stderr.write(line + "\n")
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the app and return its exit code (tests call this in-process)."""
    from typer import Abort
    from typer._click import exceptions as click_exc

    from .common import setup_logging

    setup_logging(os.environ.get("MEDGEN_VERBOSE") == "1")
    try:
        rv = app(args=argv, prog_name="medgen", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except MedgenError as e:
        return _fail(e.lines(), e.code)
    except click_exc.NoArgsIsHelpError as e:
        sys.stdout.write(e.ctx.get_help() + "\n")
        return 0
    except click_exc.UsageError as e:
        where = f"medgen {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else "medgen"
        return _fail([f"error: {e.format_message()} ({where})", f"hint: run '{where} --help'"], EXIT_USAGE)
    except (Abort, KeyboardInterrupt):
        return _fail(["error: interrupted"], EXIT_INTERRUPTED)
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so plainly
        if os.environ.get("MEDGEN_DEBUG") == "1":
            raise
        return _fail([f"error: internal error: {type(e).__name__}: {e}",
                      "hint: rerun with MEDGEN_DEBUG=1 for the traceback and report it"], EXIT_INTERNAL)


def main() -> None:
    sys.exit(run())
