"""Generate the shell completion scripts in completions/ (a test keeps them current).

    python -m medgen_cli.cli.completions completions/

Completion re-runs `medgen` on every TAB; it stays fast because no command imports torch until
it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "medgen.bash", "zsh": "_medgen", "fish": "medgen.fish"}


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="medgen", complete_var="_MEDGEN_COMPLETE", shell=shell)


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(script(shell))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
