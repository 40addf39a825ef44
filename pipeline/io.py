"""Atomic writes (an output file is either complete or absent, never half-written, even after a
power cut) and safe checkpoint reads (`torch.load(weights_only=True)`: a checkpoint cannot run code)."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import interrupts


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def cannot_write(target: str | Path, exc: OSError):
    """The one line for an output that cannot be written: `target` and why (a file standing where a
    folder must be, else the OS's reason, e.g. Permission denied)."""
    from .errors import LongtailError

    target = Path(target)
    blocking = next((f for f in target.parents if f.exists() and not f.is_dir()), None)
    why = f"{blocking} is a file" if blocking else (exc.strerror or exc.__class__.__name__)
    return LongtailError(f"cannot write {target}: {why}")


def make_folder(folder: str | Path, target: str | Path | None = None) -> Path:
    """mkdir -p `folder` (the folder of the output `target`, default the folder itself); one that cannot
    be made is one line naming the output and why (`cannot write params.yaml/out: params.yaml is a file`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if target is None:
            _not_a_file(folder)
        raise cannot_write(target or folder, exc) from None
    return folder


def _not_a_file(folder: Path):
    from .errors import LongtailError

    if folder.exists() and not folder.is_dir():
        raise LongtailError(f"cannot write {folder}/: {folder} is a file")


def _not_a_folder(path: Path):
    from .errors import LongtailError

    if path.is_dir():
        raise LongtailError(f"cannot write {path}: {path} is a folder")


def _mkdtemp(target: Path, **kwargs) -> Path:
    try:
        return Path(tempfile.mkdtemp(**kwargs, dir=target.parent))
    except OSError as exc:
        raise cannot_write(target, exc) from None


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; if the block succeeds, fsync it, move it into place and
    fsync the folder (so the rename itself is durable). The file gets the umask's mode, not 0600."""
    path = Path(path)
    make_folder(path.parent, path)
    _not_a_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(path: str | Path, by: str = "process"):
    """Yield a hidden temporary folder next to `path` (which must be absent or an empty folder); if the
    block succeeds, it becomes `path`; on any error or interrupt it is removed, so `path` is either the
    complete tree or untouched. When another `by` (e.g. another export-images) has filled `path`
    meanwhile, its tree stays and this one is dropped, with one line saying so."""
    from .errors import LongtailError

    path = Path(path)
    make_folder(path.parent, path)
    if path.exists() and not path.is_dir():
        raise LongtailError(f"cannot write {path}: {path} is a file")
    tmp = _mkdtemp(path, prefix=f".{path.name}.", suffix=".partial")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a plain folder's mode, not mkdtemp's 0700
    try:
        yield tmp
        try:
            if path.is_dir():
                path.rmdir()  # empty: a non-empty one makes this fail and keeps it
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise LongtailError(f"{path} was written by another {by} meanwhile; nothing of this run was kept") from None
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_outputs(folder: str | Path, last: str | Path) -> None:
    """What `atomic_outputs(folder, last)` can refuse at once (a file where `folder` must be, a folder
    where `last` must be): a stage calls it before any work, so the refusal is its first and only line."""
    _not_a_file(Path(folder))
    _not_a_folder(Path(last))


@contextmanager
def atomic_outputs(folder: str | Path, last: str | Path):
    """An output set that appears whole or not at all: the files a block writes into `folder`, and the
    file `last` (a stage's metrics), which marks the set complete. Yield (a hidden staging folder next
    to `folder`, a staging path named like `last` in a hidden folder next to it). If the block succeeds,
    the old `last` is removed, the staged files replace theirs in `folder` (other files there stay) and
    `last` comes last, with a Ctrl-C or SIGTERM held back until all is moved (interrupts.shielded; a
    second Ctrl-C does not wait). On any error or interrupt in the block, nothing is moved: the previous
    set stays whole. A crash inside the moves themselves (kill -9, a power cut, that second Ctrl-C) can
    leave the new files without `last`. Under `dvc repro` DVC removes a stage's outputs before it runs
    it, so there is no previous set; what stays true is that `last` never stands beside a partial set."""
    folder, last = Path(folder), Path(last)
    check_outputs(folder, last)  # again here: before the old `last` goes
    staging = []
    try:
        for target in (folder, last):
            make_folder(target.parent, target)
            staging.append(_mkdtemp(target, prefix=f".{target.name}.", suffix=".partial"))
        staged_last = staging[1] / last.name
        yield staging[0], staged_last
        with interrupts.shielded():
            files = sorted(f for f in staging[0].iterdir() if f.is_file())
            for f in (*files, staged_last):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            if last.exists():
                last.unlink()
                _fsync_dir(last.parent)  # gone for good before any new file is in place
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                os.replace(f, folder / f.name)
            _fsync_dir(folder)
            os.replace(staged_last, last)
            _fsync_dir(last.parent)
    finally:
        for tmp in staging:
            shutil.rmtree(tmp, ignore_errors=True)


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


def load_checkpoint(path: str | Path, what: str = "checkpoint", stage: str = "", require=()):
    """torch.load(weights_only=True) with a one-line error for a missing, corrupt or unsafe file, or one
    that is not a dict holding the keys in `require` (a torch file of another program). `require` is a
    sequence of keys, or a mapping key -> check (a function of the value returning what is wrong with it,
    or None) for a checkpoint whose structure and types are checked here, before anything uses them.
    torch's zip reader does not check the CRCs of the members it reads, so they are checked first: a
    checkpoint with damaged bytes is refused, never loaded as other weights."""
    import pickle
    import warnings

    import torch

    from .errors import LongtailError

    path = Path(path)
    hint = f" (run `dvc repro {stage}` to produce it)" if stage else ""
    again = f": run `dvc repro {stage}` to produce it again" if stage else ""
    if not path.exists():
        raise LongtailError(f"{what} {path} not found{hint}")
    damage = _zip_damage(path)
    if damage:
        raise LongtailError(f"{what} {path} {damage}{again}")
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle inside; its errors are reworded below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a refused class or function: a damaged file
            raise LongtailError(f"{what} {path} is corrupt or unreadable (UnpicklingError){again}") from None
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "Unsupported global" in line or "GLOBAL" in line), "")
        raise LongtailError(f"{what} {path} was refused: it holds Python objects that a checkpoint does not "
                            f"need and could run code ({detail.strip()[:160] or 'unsafe pickle'}){hint}") from None
    except Exception as exc:
        raise LongtailError(f"{what} {path} is corrupt or unreadable ({exc.__class__.__name__}){again}") from None
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        raise LongtailError(f"{what} {path} is not a longtail checkpoint (no {', '.join(missing)}){hint}")
    if isinstance(require, dict):
        for key, check in require.items():
            wrong = check(state[key])
            if wrong:
                raise LongtailError(f"{what} {path} is not a longtail checkpoint ({key} {wrong}){hint}")
    return state


def _zip_damage(path: Path) -> str | None:
    """What is wrong with the zip archive that torch.save writes, or None: not a zip at all (a plain
    pickle, torch's pre-1.6 format, another file), cut short, or a member whose bytes fail its CRC."""
    import zipfile
    import zlib

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        return "is not a torch checkpoint file (not the zip archive that torch.save writes)"
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        return f"is corrupt (a cut short or damaged zip archive: {exc})"
    if bad is not None:
        return f"is corrupt (CRC mismatch in {bad.partition('/')[2] or bad})"
    return None


WORKSPACE_LOCK = Path(".longtail/workspace.lock")


@contextmanager
def workspace_lock(stage: str, path: Path = WORKSPACE_LOCK):
    """One stage command at a time in a workspace (they share models/, metrics/ and the resume files).
    A second one fails at once with one line naming the holder; the OS drops the lock if a holder dies."""
    import fcntl

    from .errors import LongtailError

    make_folder(path.parent, path)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise LongtailError(f"{holder} is running in this workspace ({path.resolve().parent.parent}); "
                                f"wait for it to finish, or stop it, before `longtail {stage}`") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"`longtail {stage}` (pid {os.getpid()})")
        fh.flush()
        yield
    finally:
        fh.close()
