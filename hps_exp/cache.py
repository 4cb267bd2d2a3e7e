"""Stage cache: a stage's output lives in a directory named by a hash of its inputs, so a second run
(or the next job of a sweep) with the same inputs reuses it instead of recomputing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable


def content_key(inputs: Any) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_stage(cache_dir: Path, name: str, inputs: dict, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (directory, hit). On a miss, `build(tmp_dir)` fills a temp dir that is renamed into place
    only when complete: a crash mid-stage never leaves a half-written cache entry."""
    final = Path(cache_dir) / f"{name}-{content_key(inputs)}"
    if final.exists():
        print(f"[cache] {name}: hit, reusing {final}")
        return final, True
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        build(tmp)
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
        os.rename(tmp, final)
    except OSError:
        if not final.exists():  # another job finished the same stage first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[cache] {name}: built in {time.perf_counter() - started:.1f}s -> {final}")
    return final, False
