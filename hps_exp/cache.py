"""Stage cache: a stage's output lives in a directory named by a key derived from everything that can change it,
so a second run (or the next job of a sweep) with the same inputs reuses it instead of recomputing.

The key is never a hand-kept list: `stage_entry` hashes the stage's frozen config dataclass (the only config the
stage reads), the keys of its upstream results (data content fingerprints included), the numeric settings that
change its output (device type, precision) and the source code of this package (the code path).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hps_exp.io import FileLock, fresh_dir, owner_tag, publish_new_dir

if TYPE_CHECKING:
    from hps_exp.distributed import World

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


# Modules and packages (top level of hps_exp) that only read finished runs: editing them rebuilds nothing.
REPORTING = ("tables", "sweep", "tune")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the package's .py files (but the reporting ones): a code change never reuses an old result."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0].removesuffix(".py") in REPORTING:
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


class CacheError(Exception):
    """A cache entry cannot be built or published (disk full, unwritable dir): one line naming the path."""


# ---------------------------------------------------------------------------------------------- integrity

MANIFEST = "manifest.json"
FULL_HASH_BYTES = 256 << 20     # files up to this size are hashed whole; larger ones by size + sampled chunks
SAMPLES, SAMPLE_BYTES = 64, 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of the file; above FULL_HASH_BYTES, of its size and SAMPLES evenly spaced 1 MiB chunks (first and
    last included): a truncated or overwritten region is found unless it falls between the chunks."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def manifest(directory: Path) -> dict:
    """{relative path: {"size", "sha256"}} of every file of an entry (the manifest itself excluded)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST)
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_digest(p)} for p in files}


def verify(directory: Path, entry: Entry) -> str | None:
    """None when the entry is intact: its record is this entry's and every file has the size and hash recorded
    at publish. Otherwise what is wrong, in a few words."""
    try:
        recorded = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        record = json.loads((directory / "inputs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"no readable manifest/record ({type(e).__name__})"
    if record != _canonical(entry.record):
        return "inputs.json records another entry's inputs (copied in?)"
    for rel, want in recorded.items():
        f = directory / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, {want['size']} recorded"
        if file_digest(f) != want["sha256"]:
            return f"{rel}: content hash differs from the one recorded at publish"
    return None


_verified: dict[tuple[str, int], bool] = {}


def published(cache_dir: Path, name: str, key: str) -> Path:
    """The published entry `name-key` when only its key is known (a finished run names it), checked as a hit is:
    its inputs.json hashes to the key and every file has the size and hash recorded at publish. CacheError names
    what is wrong."""
    path = Path(cache_dir) / f"{name}-{key}"
    if not path.is_dir():
        raise CacheError(f"{path}: not found")
    try:
        record = json.loads((path / "inputs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}/inputs.json: unreadable ({type(e).__name__})") from None
    problem = "its inputs.json does not hash to its key" if content_key(record) != key \
        else _intact(path, Entry(name, key, record))
    if problem:
        raise CacheError(f"{path}: {problem}")
    return path


def _intact(final: Path, entry: Entry) -> str | None:
    """verify() once per entry and process (a run reads an entry more than once)."""
    key = (str(final), (final / MANIFEST).stat().st_mtime_ns if (final / MANIFEST).exists() else 0)
    if key in _verified:
        return None
    problem = verify(final, entry)
    if problem is None:
        _verified[key] = True
    return problem


# ---------------------------------------------------------------------------------------------- building

def _lock(cache_dir: Path, final: Path) -> FileLock:
    return FileLock(cache_dir / f".{final.name}.lock")


ENTRY_NAME = re.compile(r"^\.+(?P<entry>[A-Za-z0-9_]+-[0-9a-f]{16})\.")


def clean_stale(cache_dir: Path, skip: str | None = None) -> list[Path]:
    """Remove temp dirs (`.<entry>.tmp-*`, `..<entry>.checkpoint.tmp-*`) that no live builder owns: the ones
    of an entry whose lock we can take (a builder holds its entry's lock while it writes; the lock dies with
    it, in any pid namespace or host). Never a temp dir of an entry being built. `skip`: the entry whose lock
    the caller holds (never locked twice: on NFS, closing a second fd of a lock file drops the first's lock)."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    by_entry: dict[str, list[Path]] = {}
    for p in cache_dir.glob(".*.tmp-*"):
        m = ENTRY_NAME.match(p.name)
        if m:
            by_entry.setdefault(m["entry"], []).append(p)
    for name, paths in by_entry.items():
        if name == skip:
            continue
        lock = FileLock(cache_dir / f".{name}.lock")
        if not lock.try_acquire():
            continue
        try:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        finally:
            lock.release()
    return removed


def _hit(final: Path, entry: Entry, cache_dir: Path) -> bool:
    """The entry exists and is intact. A damaged one is moved aside (then deleted) so that it is rebuilt;
    the caller holds the entry's lock."""
    if not final.exists():
        return False
    problem = _intact(final, entry)
    if problem is None:
        return True
    print(f"[cache] {entry.name}: {final} fails its integrity check ({problem}); rebuilding it")
    aside = cache_dir / f".{final.name}.corrupt-{owner_tag()}"
    os.rename(final, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return False


def _build_locked(cache_dir: Path, entry: Entry, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """One builder per entry: wait for the entry's lock, reuse what its holder published, else build it."""
    final = entry.path(cache_dir)
    if final.exists() and _intact(final, entry) is None:   # published entries never change: no lock needed
        print(f"[cache] {entry.name}: hit, reusing {final}")
        return final, True
    with _lock(cache_dir, final).acquire(on_wait=lambda who: print(
            f"[cache] {entry.name}: {who or 'another job'} is building it; waiting for it", flush=True)):
        if _hit(final, entry, cache_dir):
            print(f"[cache] {entry.name}: hit, reusing {final}")
            return final, True
        tmp = _fresh_tmp(cache_dir, final)
        started = time.perf_counter()
        def build_and_publish() -> None:
            build(tmp)
            _publish(tmp, final, entry, started)

        try:
            _disk_full_is_one_line(entry, tmp, build_and_publish)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, False


def _disk_full_is_one_line(entry: Entry, tmp: Path, work: Callable[[], Any]) -> None:
    """Disk full while building or publishing: torch and safetensors say `unexpected pos ...` or similar;
    say instead what happened and where."""
    try:
        work()
    except (OSError, RuntimeError) as e:
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = None
        if not full and (free is None or free > (64 << 20)):
            raise
        raise CacheError(f"[cache] {entry.name}: disk full while writing {tmp} "
                         f"({'?' if free is None else free >> 20} MiB free): nothing was published; free space "
                         f"and rerun") from e


def cached(cache_dir: Path, entry: Entry, build: Callable[[Path], None], world: World | None = None,
           all_ranks: bool = False) -> tuple[Path, bool]:
    """Return (directory, hit) of `entry`. On a miss, `build(tmp_dir)` fills a temp dir of this process that is
    renamed into place only when complete: a crash mid-stage never leaves a half-written entry. One job builds
    an entry at a time (a lock file beside it); the others wait and reuse what it published. The entry's
    record (what its key hashes, readable) is stored as inputs.json and a manifest of its files' sizes and
    hashes as manifest.json; a reused entry is verified against both and rebuilt when it fails. Under several
    processes (`world`), the main process builds and the others wait at a barrier, then read the entry; with
    `all_ranks` (a build that trains data-parallel) every process runs `build` on the main process's temp dir,
    and only the main process writes into it. The cache dir must be on storage every process sees."""
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
        return _build_locked(cache_dir, entry, build)
    finally:
        if world is not None and world.world_size > 1:
            world.barrier()


def _cached_all_ranks(cache_dir: Path, entry: Entry, build, world) -> tuple[Path, bool]:
    final = entry.path(cache_dir)
    lock = _lock(cache_dir, final) if world.is_main else None
    if lock is not None:
        lock.acquire(on_wait=lambda who: print(f"[cache] {entry.name}: {who or 'another job'} is building it; "
                                               f"waiting for it", flush=True))
    try:
        if world.broadcast_object(_hit(final, entry, cache_dir) if world.is_main else None):
            if world.is_main:
                print(f"[cache] {entry.name}: hit, reusing {final}")
            return final, True
        tmp = Path(world.broadcast_object(str(_fresh_tmp(cache_dir, final)) if world.is_main else None))
        started = time.perf_counter()
        try:
            build(tmp)
            world.barrier()
            if world.is_main:
                _disk_full_is_one_line(entry, tmp, lambda: _publish(tmp, final, entry, started))
        finally:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        world.barrier()
        return final, False
    finally:
        if lock is not None:
            lock.release()


def _fresh_tmp(cache_dir: Path, final: Path) -> Path:
    """An empty temp dir of this process for building `final` (the caller holds the entry's lock, so any other
    temp dir of this entry is a dead builder's and is removed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(cache_dir, skip=final.name)
    for stale in [*cache_dir.glob(f".{final.name}.tmp-*"), *cache_dir.glob(f"..{final.name}.checkpoint.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return fresh_dir(cache_dir / f".{final.name}.tmp-{owner_tag()}")


def _publish(tmp: Path, final: Path, entry: Entry, started: float) -> None:
    """Record the entry's inputs and its files' hashes, then rename the finished temp dir into place (the files
    in it need no atomic writes: nothing reads the temp dir)."""
    (tmp / "inputs.json").write_text(json.dumps(_canonical(entry.record), indent=2, sort_keys=True))
    hashed = time.perf_counter()
    files = manifest(tmp)
    (tmp / MANIFEST).write_text(json.dumps(files, indent=2, sort_keys=True))
    hash_s = time.perf_counter() - hashed
    # We hold the entry's lock and found no intact entry: nothing to overwrite (should a builder that takes no
    # lock have published first, its entry is kept).
    publish_new_dir(tmp, final)
    size = sum(f["size"] for f in files.values())
    print(f"[cache] {entry.name}: built in {time.perf_counter() - started:.1f}s -> {final} "
          f"({size / 1e6:.1f} MB, hashed in {hash_s:.2f}s)")


def readable(entry: Entry) -> dict:
    """The entry's record as plain JSON (what inputs.json and a checkpoint's meta.json hold)."""
    return _canonical(entry.record)
