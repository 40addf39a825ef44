"""The command-line tools longtail runs (dvc, git): each is looked up here before it is run, so a
missing one is one line, the same for every command, never a FileNotFoundError traceback."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .errors import LongtailError


def require(tool: str) -> str:
    """The path of `tool` on PATH, or LongtailError('dvc is not installed or not on PATH ...'). When it is
    installed beside this Python (a virtual environment run without activating it), say so."""
    path = shutil.which(tool)
    if path is not None:
        return path
    beside = Path(sys.executable).parent / tool
    hint = (f": it is in {beside.parent}, the environment longtail runs from; activate it (or add that folder to PATH)"
            if beside.is_file() else "")
    raise LongtailError(f"{tool} is not installed or not on PATH{hint}")


def why_failed(code: int, *outputs: str) -> str:
    """The line of a failed dvc or git command's output that says why (without its prefix): DVC's first
    `ERROR: ...` line (DVC ends with a support footer, "Having any troubles? Hit us up at
    https://dvc.org/support"), git's `fatal: ...` or `error: ...`, else the last line; the exit status
    when it printed nothing."""
    lines = [line.strip() for output in outputs for line in (output or "").splitlines() if line.strip()]
    for prefix in ("ERROR:", "fatal:", "error:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[0][len(prefix):].strip()
    return lines[-1] if lines else f"exit status {code}"
