"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import stat
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import StepError


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: readers never see half a file.

    The file keeps the mode of the one it replaces, or gets the usual `0o666 & ~umask` when
    new (mkstemp's own 0o600 would make a rendered module unreadable to a build user)."""
    hint = "check that the output directory can be created and written to"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StepError("write", f"cannot create the directory {path.parent}: {exc.strerror or exc}", hint) from None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StepError("write", f"cannot write {path}: {exc.strerror or exc}", hint) from None
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StepError("write", f"cannot write {path}: {exc.strerror or exc}", hint) from None
        raise
