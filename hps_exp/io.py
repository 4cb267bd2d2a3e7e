"""Files that several jobs share (the stage cache, a run dir): locks, temp names, and the one way this package
writes a file or publishes a directory so that a reader never sees it half-written.

Atomic writes: a file is written whole into a temp file beside it, then renamed over the target; a directory is
filled under a temp name, then renamed into place. Both end up with the permissions a plain open() / mkdir() gives
(what the umask allows), never mkstemp's private 0600, so results and a shared cache stay readable by the group.

Liveness never rests on a pid: a lock is an exclusive `flock` on an open file, which the kernel (or, on NFS,
the server's lease) drops the moment its holder dies, whatever its pid namespace or host. A temp name carries
host, pid and a per-process random token, so two processes never write into the same temp path even when
containers on one node reuse pids.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

PathLike = str | os.PathLike


@lru_cache(maxsize=1)
def _token() -> str:
    return secrets.token_hex(3)


def owner_tag() -> str:
    """`<host>-<pid>-<token>`: names this process's temp files (unique even across pid namespaces)."""
    host = socket.gethostname().replace("-", "_").replace(".", "_") or "host"
    return f"{host}-{os.getpid()}-{_token()}"


class Busy(Exception):
    """The lock is held by a live process (`holder` says who, as it wrote it)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder or 'another process'}")


class FileLock:
    """An exclusive lock on `path` while this object holds its fd. The file's content (host, pid, since) is
    only for messages. The lock file itself is never deleted (deleting a lock file races with its next user)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> "FileLock":
        """Take the lock; with `wait` block until the holder releases it or dies (`on_wait(holder)` is called
        once first), else raise Busy at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not wait:
                    raise Busy(self.path, self.holder()) from None
                if on_wait is not None:
                    on_wait(self.holder())
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def try_acquire(self) -> bool:
        try:
            self.acquire(wait=False)
        except Busy:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FileLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- atomic files and directories

def _umask() -> int:
    # the umask can only be read by setting it: put it back at once
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file + rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """`text` (UTF-8) to `path` via a temp file + rename, as atomic_write_bytes."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Delete a directory tree or a file; nothing when it is absent. `ignore_errors`: a tree that cannot be
    removed whole is left as it is (best-effort cleanup of what a finished stage no longer needs)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    elif path.exists():
        path.unlink()


def fresh_dir(path: Path) -> Path:
    """`path` as a new empty directory (whatever was there removed) to fill before `publish_dir`. Made by mkdir,
    so with the umask's permissions (mkdtemp would make it 0700, and the published directory with it)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish_dir(tmp: Path, final: Path, aside: Path | None = None) -> None:
    """Rename the finished directory `tmp` to `final`. A `final` already there is first renamed to `aside`
    (default `.<final>.old-<owner>`) and removed once the new one is in place: at every moment one complete
    directory is at `final` or at `aside` (a resume may look for it there), never a half-written one."""
    aside = aside if aside is not None else final.with_name(f".{final.name}.old-{owner_tag()}")
    remove(aside)
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    try:
        remove(aside)
    except OSError:   # the new directory is in place; a leftover aside (say, a file NFS still holds open) is harmless
        pass


def publish_new_dir(tmp: Path, final: Path) -> bool:
    """Rename the finished directory `tmp` to `final`, which must not exist: False (and `tmp` left to the caller)
    when another writer published `final` first, whose directory is kept."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        return False
    return True
