"""Stage cache: a stage's output lives in a directory named by a key derived from everything that can change it,
so a second run (or the next job of a sweep) with the same inputs reuses it instead of recomputing.

The key is never a hand-kept list: `stage_entry` hashes the stage's frozen config dataclass (the only config the
stage reads), the keys of its upstream results (data content fingerprints included), the numeric settings that
change its output (device type, precision) and the source code of this package (the code path).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

PACKAGE = Path(__file__).resolve().parent


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{f.name: _canonical(getattr(obj, f.name))
                                                     for f in dataclasses.fields(obj)}}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}; stage configs hold plain values only")


def content_key(inputs: Any) -> str:
    """Hash of a JSON-able value (dataclasses, dicts, lists, scalars); the same value gives the same key."""
    blob = json.dumps(_canonical(inputs), sort_keys=True, allow_nan=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Modules that only report on finished runs and cannot change a stage's output.
REPORTING = ("tables.py", "sweep.py")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the package's .py files (but the reporting ones): a code change never reuses an old result."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in REPORTING and path.parent == PACKAGE:
            continue
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One stage's cache entry: its key and the readable record the key hashes (stored as inputs.json)."""
    name: str
    key: str
    record: dict

    def path(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"{self.name}-{self.key}"


def stage_entry(name: str, config: Any, inputs: Mapping[str, str | None], numeric: Mapping[str, Any]) -> Entry:
    """The cache entry of one stage: keyed by its config dataclass, upstream keys, numeric settings and the code."""
    record = {"stage": name, "config": config, "inputs": dict(inputs), "numeric": dict(numeric),
              "code": code_fingerprint()}
    return Entry(name, content_key(record), record)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(cache_dir: Path) -> list[Path]:
    """Remove temp dirs left by killed builds on this host: `.<entry>.tmp-<host>-<pid>` whose process is gone.
    A temp dir of a live process, or of another host (whose processes we cannot see), is never touched."""
    removed = []
    if not cache_dir.is_dir():
        return removed
    host = _host()
    for p in cache_dir.glob(".*.tmp-*"):
        owner = p.name.rpartition(".tmp-")[2]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def cached(cache_dir: Path, entry: Entry, build: Callable[[Path], None], world=None,
           all_ranks: bool = False) -> tuple[Path, bool]:
    """Return (directory, hit) of `entry`. On a miss, `build(tmp_dir)` fills a temp dir that is renamed into place
    only when complete: a crash mid-stage never leaves a half-written entry. The entry's record (what its key
    hashes, readable) is stored beside the output as inputs.json. Under several processes (`world`), the main
    process builds and the others wait at a barrier, then read the entry; with `all_ranks` (a build that trains
    data-parallel) every process runs `build` on the main process's temp dir, and only the main process writes
    into it. The cache dir must be on storage every process sees."""
    cache_dir = Path(cache_dir)
    final = entry.path(cache_dir)
    if world is not None and world.world_size > 1 and all_ranks:
        return _cached_all_ranks(cache_dir, entry, build, world)
    if world is not None and not world.is_main:
        world.barrier()
        if not final.exists():
            raise RuntimeError(f"[cache] {entry.name}: the main process did not produce {final}")
        return final, True
    try:
        if final.exists():
            print(f"[cache] {entry.name}: hit, reusing {final}")
            return final, True
        tmp = _fresh_tmp(cache_dir, final)
        started = time.perf_counter()
        try:
            build(tmp)
            _publish(tmp, final, entry, started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, False
    finally:
        if world is not None and world.world_size > 1:
            world.barrier()


def _cached_all_ranks(cache_dir: Path, entry: Entry, build, world) -> tuple[Path, bool]:
    final = entry.path(cache_dir)
    if world.broadcast_object(final.exists()):
        if world.is_main:
            print(f"[cache] {entry.name}: hit, reusing {final}")
        return final, True
    tmp = Path(world.broadcast_object(str(_fresh_tmp(cache_dir, final)) if world.is_main else None))
    started = time.perf_counter()
    try:
        build(tmp)
        world.barrier()
        if world.is_main:
            _publish(tmp, final, entry, started)
    finally:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    return final, False


def _fresh_tmp(cache_dir: Path, final: Path) -> Path:
    """An empty temp dir for building `final`, named so that `clean_stale` knows its owner."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(cache_dir)
    tmp = cache_dir / f".{final.name}.tmp-{_host()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, entry: Entry, started: float) -> None:
    """Record the entry's inputs and rename the finished temp dir into place."""
    (tmp / "inputs.json").write_text(json.dumps(_canonical(entry.record), indent=2, sort_keys=True))
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():  # another job finished the same stage first: keep theirs
            raise
    print(f"[cache] {entry.name}: built in {time.perf_counter() - started:.1f}s -> {final}")
