"""Atomic file output: write to a temp file beside the target, then rename over it.

A crash, a full disk or Ctrl-C leaves either the old file or the new one, never half of one.
Files get the mode a plain ``open()`` would give them (0666 & ~umask: 0644 under umask 022),
not mkstemp's 0600, so a server running as another user (Triton in a container) can read them.

Inside ``with transaction():`` (every sn_deploy command runs in one) a failure also undoes the
files written before it: new files and the folders made for them are removed, replaced files get
their previous contents back. A run that fails at its third file leaves the folder as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import os
import secrets
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

from sn_deploy.errors import OutputError

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file."""
    return 0o666 & ~current_umask()


def output_error(path: PathLike, exc: OSError) -> OutputError:
    """One line naming the file, the cause and the fix (a temp file's name would mislead)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        fix = "free space on that disk or write elsewhere"
    elif exc.errno == errno.EFBIG:
        fix = "the file system or 'ulimit -f' caps the file size; write elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    else:
        fix = "check the path and the disk"
    return OutputError(f"cannot write '{path}' ({reason}); {fix}")


class Transaction:
    """What one job wrote, so that a failure can put every file back as it was."""

    def __init__(self) -> None:
        self.created: list[Path] = []                  # new files, in order
        self.backups: list[tuple[Path, Path]] = []     # (target, hard link to its old contents)
        self.dirs: list[Path] = []                     # folders made by makedirs, parents first
        self.watched: list[tuple[Path, set[Path]]] = []  # (root, folders under it before)

    def replace(self, tmp: Path, path: Path) -> None:
        """Rename ``tmp`` over ``path``, keeping the old file (if any) until commit."""
        with _signals_held():  # the record and the rename happen together
            known = path in self.created or any(t == path for t, _ in self.backups)
            if not known and path.is_file():
                self.backups.append((path, _set_aside(path)))
            elif not known:
                self.created.append(path)
            os.replace(tmp, path)

    def makedirs(self, path: Path) -> None:
        missing = []
        for p in [path, *path.parents]:
            if p.exists():
                break
            missing.append(p)
        path.mkdir(parents=True, exist_ok=True)
        self.dirs.extend(reversed(missing))

    def watch(self, root: Path) -> None:
        """Remember which folders exist under ``root``; a rollback removes empty new ones."""
        self.watched.append((root, set(_folders(root))))

    def absorb(self, inner: "Transaction") -> None:
        self.created += inner.created
        self.backups += inner.backups
        self.dirs += inner.dirs
        self.watched += inner.watched

    def commit(self) -> None:
        with _signals_held():
            for _, backup in self.backups:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)

    def rollback(self) -> None:
        with _signals_held():
            for path in reversed(self.created):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            for path, backup in reversed(self.backups):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(backup, path)
            for root, before in self.watched:
                for folder in sorted(set(_folders(root)) - before, key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        folder.rmdir()          # only if empty: never another job's files
            for folder in reversed(self.dirs):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _set_aside(path: Path) -> Path:
    """A hard link to ``path``'s current contents under a hidden name beside it."""
    while True:
        backup = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: move it aside instead
            if not backup.exists():
                os.replace(path, backup)
                return backup


def _folders(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield root
        for parent, dirs, _ in os.walk(root):
            for d in dirs:
                yield Path(parent) / d


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a commit or rollback waits until it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_current: contextvars.ContextVar[Optional[Transaction]] = contextvars.ContextVar(
    "sn_deploy_transaction", default=None)


@contextlib.contextmanager
def transaction() -> Iterator[Transaction]:
    """Every atomic write inside the block is undone if the block raises.

    Nested blocks join the outer one: their files are undone if the outer block fails later.
    """
    outer = _current.get()
    tx = Transaction()
    token = _current.set(tx)
    try:
        yield tx
    except BaseException:
        _current.reset(token)
        tx.rollback()
        raise
    _current.reset(token)
    if outer is not None:
        outer.absorb(tx)
    else:
        tx.commit()


def transactional(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` inside :func:`transaction`: when it raises, its files are undone."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with transaction():
            return fn(*args, **kwargs)

    return wrapper


def makedirs(path: PathLike) -> Path:
    """``mkdir -p`` whose new folders a failing transaction removes again (OSError as is)."""
    path = Path(path)
    tx = _current.get()
    if tx is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        tx.makedirs(path)
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_on_failure: bool = False) -> Iterator[Path]:
    """Yield a temp path in the target's folder; it replaces ``path`` only if the block succeeds.

    OSErrors (full disk, read-only disk) become one OutputError naming ``path``.
    ``keep_on_failure``: the file is not part of the current transaction (a resumable state
    that must outlive the failing run).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from None
    tx = None if keep_on_failure else _current.get()
    try:
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        yield Path(tmp)
        _fsync(tmp)
        if tx is None:
            os.replace(tmp, path)
        else:
            tx.replace(Path(tmp), path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(path, exc) from None
        raise


def _fsync(path: str) -> None:
    """On disk before the rename: a power cut must not leave an empty file under the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: Union[bytes, str], keep_on_failure: bool = False) -> Path:
    """Write bytes or UTF-8 text to ``path`` atomically."""
    with atomic_path(path, keep_on_failure=keep_on_failure) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
