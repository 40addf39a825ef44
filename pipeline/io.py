"""Atomic writes: an output file is either complete or absent, never half-written."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; move it into place only if the block succeeds. The file
    gets the mode a plain open() would give (0644 under the usual umask), not mkstemp's 0600, so an
    MLflow server or another user on the host can read the outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, header, rows) -> None:
    """The one CSV writer: a header row, then the rows, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def save_torch(path: str | Path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, what: str = "checkpoint", stage: str = ""):
    """torch.load with a one-line error for a missing or corrupt file."""
    import torch

    from .errors import LongtailError

    path = Path(path)
    hint = f" (run `dvc repro {stage}` to produce it)" if stage else ""
    if not path.exists():
        raise LongtailError(f"{what} {path} not found{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LongtailError(f"{what} {path} is corrupt or unreadable ({exc.__class__.__name__}){hint}") from exc
