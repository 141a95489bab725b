"""Writing files so that no reader ever sees half of one, and output paths checked before any work.

``atomic_write`` is the one way this package writes a file: the bytes go to a temp file beside
the target (same filesystem), are fsynced, get the permissions an ordinary file would get, and
are renamed over the target. A failure leaves the old file (or none) and no temp file behind.
``write_folder`` does the same for a whole folder: built beside it in ``NAME.partial``, renamed into place.
``output_folder`` refuses, in one line, an output path that is a file or cannot be written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (temp file beside it, fsynced, mode 0666 & ~umask)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # named by the file asked for, not the temp file
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(folder: Path, names: str) -> None:
    """Delete the temp files ``atomic_write`` left in ``folder`` for targets matching the glob ``names`` when a
    kill came mid-write; only for a folder the caller alone writes (it holds its lock)."""
    for path in folder.glob(f".{names}.*.tmp"):
        path.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, text.encode())


def atomic_write_json(path: Path | str, data: object, indent: int = 4) -> None:
    atomic_write(path, (json.dumps(data, indent=indent, default=str) + "\n").encode())


def write_folder(dest: Path, fill: Callable[[Path], None]) -> None:
    """Create ``dest`` whole: ``fill`` writes into ``dest.partial`` (one a killed run left is discarded first),
    which is then renamed to ``dest`` (absent, or an empty folder). A failure leaves no partial folder behind."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        fill(partial)
        if dest.is_dir():
            dest.rmdir()  # only an empty one: a folder with files in it is never replaced
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def copy_config_files(src: Path, dest: Path) -> None:
    """Every vLLM config file of ``src`` and its sidecar (``E=*.json``), byte for byte, into ``dest``."""
    for path in sorted(src.glob("E=*.json")):
        shutil.copyfile(path, dest / path.name)


def output_folder(path: Path | str, option: str) -> Path:
    """``path`` as a folder this process can create files in; one-line refusal otherwise (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a folder; pass a folder path")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether it can be created
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {probe} is not writable; pass a folder you can write to")
    return path


def output_file(path: Path | str, option: str) -> Path:
    """``path`` as a file this process can (re)write; one-line refusal for a folder or an unwritable place."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; pass a file path")
    if (up := next((p for p in path.parents if p.exists()), None)) and not up.is_dir():
        raise UsageError(f"{option} {path}: {up} is a file, not a folder; pass a file path in a folder")
    output_folder(path.parent if str(path.parent) else Path("."), option)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: exists and is read-only; pass another file path")
    return path
