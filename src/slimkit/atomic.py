"""Atomic file writes: a temp file in the same directory, fsync, os.replace.

The temp file is called ``.<name>.slimkit-tmp.<8 hex digits>``. It gets the mode of the file
it replaces, or ``0666 & ~umask`` for a new file (the mode a plain ``open`` would give).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_MARK = "slimkit-tmp"


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: flush a directory entry, so that a rename inside it survives a crash
fsync_dir = fsync_file


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open`` (0666) or ``mkdir`` (0777) gives a new file under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On failure the temp file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp(target)
    try:
        yield tmp
        os.chmod(tmp, mode)  # after writing: a read-only mode would stop the writer
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new empty file ``.<name>.slimkit-tmp.<hex>`` beside ``target`` (mode 0600), and the
    mode it is to get: the one ``target`` has, or the one a new file would get."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = default_mode()
    while True:
        tmp = target.with_name(f".{target.name}.{TEMP_MARK}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp, mode


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` by calling ``writer(temp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
