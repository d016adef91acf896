"""Scratch directories beside a target path, and telling a stale one from one in use.

A scratch directory of the target ``<parent>/<name>`` is called
``<parent>/.<name>.slimkit-<kind>.<pid>.<8 hex digits>``; ``kind`` is

- ``stage``: a save being written (it becomes ``<name>`` when finished),
- ``old``: the previous ``<name>`` while the two-rename fallback replaces it,
- ``baseline``: the command line's temporary fp32 artifact.

The process that creates one holds an exclusive ``flock`` on the directory while it uses it
(the kernel drops the lock when the process dies, ``kill -9`` included). Another process
takes a scratch directory of the same target as stale only when it can take that lock too
and the pid in the name is no running process (or the directory is older than
``STALE_AFTER`` seconds: the pid was reused). ``tidy(target)`` removes stale ones, and moves
a stale ``old`` back to ``<name>`` when ``<name>`` is missing (a crash between the two
renames). Older slimkit versions staged saves in ``.<name>.<8 characters>.tmp``; such a
directory holding nothing but artifact files and untouched for ``STALE_AFTER`` seconds is
stale too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from slimkit.io.layout import OWN_FILES

SCRATCH_KINDS = ("stage", "old", "baseline")
STALE_AFTER = 60.0
_REST = re.compile(r"(?P<kind>stage|old|baseline)\.(?P<pid>[1-9][0-9]*)\.[0-9a-f]{8}")
_NAME = re.compile(r"\.(?P<name>.+)\.slimkit-stage\.[1-9][0-9]*\.[0-9a-f]{8}")
_LEGACY = re.compile(r"[a-z0-9_]{8}\.tmp")


def scratch_name(target: Path, kind: str, pid: int | None = None) -> str:
    """A fresh name for a ``kind`` scratch directory of ``target`` (see the module doc)."""
    if kind not in SCRATCH_KINDS:
        raise ValueError(f"unknown scratch kind {kind!r}")
    return f".{target.name}.slimkit-{kind}.{pid or os.getpid()}.{secrets.token_hex(4)}"


def parse_name(entry: str, target: Path) -> tuple[str, int] | None:
    """``(kind, pid)`` when ``entry`` is the name of a scratch directory of ``target``."""
    prefix = f".{target.name}.slimkit-"
    found = _REST.fullmatch(entry[len(prefix) :]) if entry.startswith(prefix) else None
    return None if found is None else (found["kind"], int(found["pid"]))


def target_of(path: Path) -> Path | None:
    """The target whose staging directory (or a path inside one) ``path`` is, else None."""
    for p in (path, *path.parents):
        found = _NAME.fullmatch(p.name)
        if found is not None:
            return p.parent / found["name"]
    return None


@dataclass
class Scratch:
    """A scratch directory and the open descriptor holding its lock."""

    path: Path
    fd: int | None

    def release(self, remove: bool = True) -> None:
        """Remove the directory (unless ``remove`` is False), then drop the lock."""
        try:
            if remove:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def create(target: Path, kind: str) -> Scratch:
    """Make and lock a new ``kind`` scratch directory beside ``target`` (mode from umask)."""
    while True:
        path = target.parent / scratch_name(target, kind)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        try:
            return Scratch(path, lock(path))
        except BaseException:
            os.rmdir(path)
            raise


def lock(path: Path) -> int | None:
    """Open the directory ``path`` and take its exclusive lock; the open descriptor, or None
    where the file system has no locks. OSError(EWOULDBLOCK) when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return fd


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (it may belong to another user)."""
    if pid <= 0:
        return True  # never signal a process group: treat as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tidy(target: Path) -> list[str]:
    """Remove the stale scratch directories of ``target``; put a stale ``old`` back when
    ``target`` is missing. Returns one line per thing done (for a note or a log)."""
    done: list[str] = []
    olds: list[Scratch] = []
    for path, kind in candidates(target):
        claimed = _claim(path, kind)
        if claimed is None:
            continue
        if kind == "old":
            olds.append(claimed)
        else:
            claimed.release()
            done.append(f"removed stale {path.name}")
    done += _settle_olds(target, olds)
    return done


def candidates(target: Path) -> list[tuple[Path, str]]:
    """Directories beside ``target`` named as its scratch (kind ``legacy`` for old names)."""
    try:
        entries = list(os.scandir(target.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        parsed = parse_name(entry.name, target)
        if parsed is not None:
            found.append((Path(entry.path), parsed[0]))
        elif _is_legacy_name(entry.name, target):
            found.append((Path(entry.path), "legacy"))
    return sorted(found)


def _is_legacy_name(entry: str, target: Path) -> bool:
    prefix = f".{target.name}."
    return entry.startswith(prefix) and _LEGACY.fullmatch(entry[len(prefix) :]) is not None


def _claim(path: Path, kind: str) -> Scratch | None:
    """The scratch directory ``path`` with its lock taken when it is stale; None otherwise."""
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return None
    if kind == "legacy":
        return Scratch(path, None) if age > STALE_AFTER and _only_own_files(path) else None
    pid = int(path.name.split(".")[-2])
    if pid_alive(pid) and age <= STALE_AFTER:
        return None
    try:
        fd = lock(path)
    except OSError:  # held: in use
        return None
    if fd is None and pid_alive(pid):  # no locks on this file system: trust only the pid
        return None
    return Scratch(path, fd)


def _only_own_files(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return all(
            e.name in OWN_FILES and stat.S_ISREG(e.stat(follow_symlinks=False).st_mode)
            for e in os.scandir(path)
        )
    return False


def _settle_olds(target: Path, olds: list[Scratch]) -> list[str]:
    """Move the newest stale ``old`` back to a missing ``target``; remove the others."""
    done = []
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda s: s.path.lstat().st_mtime)
        os.rename(newest.path, target)
        newest.release(remove=False)
        olds.remove(newest)
        done.append(f"restored {target} from {newest.path.name}")
    for old in olds:
        old.release()
        done.append(f"removed stale {old.path.name}")
    return done
