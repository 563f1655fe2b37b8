"""Atomic file writes for every file lazarus-core produces: a file is either its old self, absent, or whole.

Each write goes to a unique temporary name in the target's own directory (``tempfile.mkstemp``, so two
writers never share a temporary file), is flushed and fsynced, then renamed over the target with
``os.replace``; the directory is fsynced after the rename so the new name survives a crash. On any error,
Ctrl-C included, the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp makes 0600 files): the target's own mode when
    it exists, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``numpy.save``). The caller writes the
    whole file to the yielded path inside the ``with`` block.

    Parameters
    ----------
    path : str or PathLike
        The final file. Its directory must exist.

    Raises
    ------
    IsADirectoryError
        ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file name")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, _new_file_mode(path))
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (unique temporary file in the same directory, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    """Write ``obj`` as indented JSON with a trailing newline to ``path`` atomically.

    Raises
    ------
    ValueError
        ``allow_nan=False`` and ``obj`` holds NaN or infinity.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n")


def check_output_file(path: str | os.PathLike, *, flag: str = "-o/--output") -> Path:
    """Fail fast, before any long computation, when ``path`` cannot be written as a file.

    Creates missing parent directories and probes the directory with a temporary file.

    Raises
    ------
    IsADirectoryError
        ``path`` is a directory.
    FileExistsError
        A parent of ``path`` is a file.
    PermissionError
        The directory is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory, expected a file name")
    _probe_directory(path.parent, flag, path)
    return path


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """Fail fast when ``path`` cannot be used as an output directory (created if missing).

    Raises
    ------
    FileExistsError
        ``path`` or one of its parents is a file.
    PermissionError
        ``path`` cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path}: exists and is not a directory")
    _probe_directory(path, flag, path)
    return path


def _probe_directory(directory: Path, flag: str, named: Path) -> None:
    for parent in [directory, *directory.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{flag} {named}: {parent} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lazarus-write-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise PermissionError(f"{flag} {named}: permission denied (cannot write in {directory})") from None


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_output_dir",
           "check_output_file"]
