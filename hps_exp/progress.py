"""Progress bars that do not flood logs: a live tqdm bar on a terminal; elsewhere (a log file, CI, a SLURM or
`make run > log` job) one plain line each time another `every` percent is done, instead of a `\\r` redraw
many times a second (one `make run` wrote 100 KB of those). `HPS_EXP_NO_PROGRESS=1` turns them off.

`progress_bar(...)` returns a tqdm object either way, so callers (and vLLM, which takes the factory as
`use_tqdm`) use the whole tqdm API: update, set_postfix, n, format_dict, close.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

EVERY_PERCENT = 10


class LineBar(tqdm):
    """tqdm that writes its status as a plain line when the done fraction reaches the next `every` percent."""

    def __init__(self, *args, every: int = EVERY_PERCENT, **kwargs):
        self._every, self._shown = every, -1
        super().__init__(*args, **{**kwargs, "leave": False, "dynamic_ncols": False, "mininterval": 0})

    def display(self, msg=None, pos=None) -> bool:
        if msg == "" or not self.total:   # tqdm clearing the line at close; nothing to say without a total
            return False
        step = int(100 * min(self.n, self.total) / self.total) // self._every
        if step > self._shown:
            self._shown = step
            self.fp.write(self.format_meter(**{**self.format_dict, "ncols": 0}) + "\n")
            self.fp.flush()
        return True


def progress_bar(total: int | None = None, desc: str | None = None, *, initial: int = 0, disable: bool = False,
                 file=None, **kwargs) -> tqdm:
    """A tqdm bar where `file` (stderr) is a terminal, a LineBar elsewhere; disabled by `disable` or
    HPS_EXP_NO_PROGRESS=1. Extra keyword arguments go to tqdm."""
    file = file or sys.stderr
    disable = disable or not enabled()
    if disable or _is_terminal(file):
        return tqdm(total=total, desc=desc, initial=initial, disable=disable, file=file,
                    **{"dynamic_ncols": True, **kwargs})
    kwargs.pop("dynamic_ncols", None)
    return LineBar(total=total, desc=desc, initial=initial, file=file, **kwargs)


def enabled() -> bool:
    """Progress is shown unless HPS_EXP_NO_PROGRESS=1 (the tests, benchmarks)."""
    return os.environ.get("HPS_EXP_NO_PROGRESS") != "1"


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False
