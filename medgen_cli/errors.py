"""Errors a user can cause, each with its documented exit code (CONTRACTS.md).

Raise one of these anywhere in medgen; the CLI prints it as two lines on stderr::

    error: <what> (<where>)
    hint: <how to fix>

and exits with the class's code. Any other exception is a bug (exit 1, traceback only with
MEDGEN_DEBUG=1). Imports nothing heavy.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_INPUT = 4
EXIT_RESOURCE = 5
EXIT_CHECK = 6
EXIT_INTERRUPTED = 130


class MedgenError(Exception):
    """A failure the user can fix. ``what`` is one line, ``where`` names the file/option."""

    code = EXIT_INTERNAL

    def __init__(self, what: str, where: str = "", hint: str = "", details: list[str] | None = None):
        super().__init__(what)
        self.what = what
        self.where = str(where) if where else ""
        self.hint = hint
        self.details = list(details or [])  # extra lines (e.g. every preset error at once)

    def lines(self) -> list[str]:
        head = f"error: {self.what}" + (f" ({self.where})" if self.where else "")
        out = [head, *(f"  {d}" for d in self.details)]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out

    def record(self) -> dict:
        return {"code": self.code, "message": self.lines()[0][len("error: "):], "hint": self.hint}


class UsageError(MedgenError):
    code = EXIT_USAGE


class ConfigError(MedgenError):
    code = EXIT_CONFIG


class InputError(MedgenError):
    code = EXIT_INPUT


class ResourceError(MedgenError):
    code = EXIT_RESOURCE


class CheckFailed(MedgenError):
    code = EXIT_CHECK


class Interrupted(MedgenError):
    """Raised after a run saved its state in response to SIGTERM/SIGUSR1/SIGINT."""

    code = EXIT_INTERRUPTED


def did_you_mean(word: str, choices) -> str:
    """A ' did you mean X?' suffix, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""
