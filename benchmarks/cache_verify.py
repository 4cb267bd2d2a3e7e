"""What verifying a cache hit costs: hashing an entry's files (hps_exp.cache.file_digest), whole up to 256 MiB and
sampled (size + 64 x 1 MiB chunks) above, against the file's size. Prints seconds and MB/s per size (min and
median of 5, the sizes interleaved) and the load average at the start and end.

    PYTHONPATH=$PWD python benchmarks/cache_verify.py [--dir /path/on/the/cache/storage]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from hps_exp.cache import file_digest

SIZES_MB = (1, 16, 128, 256, 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        files = {}
        for mb in SIZES_MB:
            f = Path(d) / f"{mb}.bin"
            with open(f, "wb") as out:   # real bytes (a sparse file would read faster than a model file)
                block = os.urandom(1 << 20)
                for _ in range(mb):
                    out.write(block)
            files[mb] = f
        times: dict[int, list[float]] = {mb: [] for mb in SIZES_MB}
        for _ in range(args.repeats):
            for mb, f in files.items():   # interleaved: a load change hits every size alike
                t = time.perf_counter()
                file_digest(f)
                times[mb].append(time.perf_counter() - t)
        for mb in SIZES_MB:
            lo, med = min(times[mb]), statistics.median(times[mb])
            kind = "sampled" if file_digest(files[mb]).startswith("sampled:") else "whole"
            print(f"{mb:>5} MB  {kind:<7}  min {lo:.3f}s  median {med:.3f}s  ({mb / med:.0f} MB/s of file)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}  (page cache warm: the files were just written)")


if __name__ == "__main__":
    main()
