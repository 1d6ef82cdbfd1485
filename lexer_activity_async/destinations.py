"""Checks that local output paths can be written, made before any request is sent.

A destination that cannot be written would otherwise be found only after an export job
has run (spending the token's rate budget) or a backfill has started. The checks create
nothing: a missing folder passes when its nearest existing parent is a writable folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .exceptions import OutputError

__all__ = ["check_directory", "check_file_destination", "output_error"]


def output_error(path: object, error: OSError) -> OutputError:
    """An `OutputError` for ``path`` with the OS's reason (e.g. "No space left on device")."""
    return OutputError(path, error.strerror or type(error).__name__)


def check_directory(path: str | os.PathLike[str]) -> Path:
    """Raise `OutputError` unless ``path`` is, or could be created as, a writable folder.

    Writability is tested by creating and removing an empty file in the nearest existing
    folder, which is what the write will need (permission bits alone mislead: root
    ignores them, and a read-only mount honours none)."""
    folder = Path(path)
    _check_folder(folder, folder)
    return folder


def _check_folder(folder: Path, named: Path) -> None:
    """Check ``folder``; errors name ``named`` (the path the caller gave)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    where = "" if existing == named else f" ({existing})"
    if not existing.is_dir():
        raise OutputError(named, f"not a directory{where}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lexer-write-check-")
    except OSError as error:
        raise OutputError(named, f"{error.strerror or type(error).__name__}{where}") from None
    os.close(fd)
    os.unlink(probe)


def check_file_destination(path: str | os.PathLike[str]) -> Path:
    """Raise `OutputError` unless a file can be written (atomically, via a sibling
    temporary file) at ``path``: not a folder, not a device, in a writable folder."""
    dest = Path(path)
    if dest.is_dir():
        raise OutputError(dest, "is a directory; give a file name")
    if dest.exists() and not dest.is_file():
        raise OutputError(dest, "exists and is not a regular file")
    _check_folder(dest.parent, dest)
    return dest
