"""Locks and names for files that several jobs share (the stage cache, a run dir).

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
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable


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
