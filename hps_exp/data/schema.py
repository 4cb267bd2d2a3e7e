"""The one schema every loader produces: a prompt with n candidate responses.

An `Example` holds n >= 2 responses to one prompt. Preference comes either from
`scores` (higher is better, e.g. a reward model's r-hat) or, when `scores` is None,
from the dataset's own (chosen, rejected) pair. `harmful` holds per-response
safety labels where the dataset has them (used for the harmful-rate metric).
`source` is "file:line" (or a generator name) so errors can point at the row.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    """Bad input data; the message names the file and line (or the config key)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...] | None = None
    harmful: tuple[bool, ...] | None = None
    chosen: int = 0
    rejected: int = 1
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.source or "example"
        n = len(self.responses)
        if n < 2:
            raise DataError(f"{where}: needs at least 2 responses, got {n}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DataError(f"{where}: empty or non-text prompt")
        for i, r in enumerate(self.responses):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f"{where}: response {i} is empty or not text")
        if self.scores is not None and len(self.scores) != n:
            raise DataError(f"{where}: {len(self.scores)} scores for {n} responses")
        if self.harmful is not None and len(self.harmful) != n:
            raise DataError(f"{where}: {len(self.harmful)} harmful labels for {n} responses")
        if not (0 <= self.chosen < n and 0 <= self.rejected < n and self.chosen != self.rejected):
            raise DataError(f"{where}: chosen={self.chosen}, rejected={self.rejected} invalid for {n} responses")

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def best(self) -> int:
        """Index of the preferred response: argmax score (first on ties), else the dataset's chosen."""
        if self.scores is None:
            return self.chosen
        return max(range(self.n), key=lambda i: (self.scores[i], -i))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d["responses"] = list(self.responses)
        if self.scores is not None:
            d["scores"] = list(self.scores)
        if self.harmful is not None:
            d["harmful"] = list(self.harmful)
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "") -> "Example":
        try:
            return cls(
                prompt=d["prompt"],
                responses=tuple(d["responses"]),
                scores=None if d.get("scores") is None else tuple(float(s) for s in d["scores"]),
                harmful=None if d.get("harmful") is None else tuple(bool(h) for h in d["harmful"]),
                chosen=int(d.get("chosen", 0)),
                rejected=int(d.get("rejected", 1)),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{source or 'row'}: {type(e).__name__}: {e}") from None


@dataclass
class Splits:
    """What a dataset loader returns."""
    train: list[Example]
    test: list[Example]
    name: str = ""


def open_text(path: str | os.PathLike) -> Iterator[str]:
    """Lines of a .jsonl or .jsonl.gz file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        yield from f


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict | DataError]]:
    """("file:line", row) for each non-blank line; a line that is not a JSON object yields
    ("file:line", DataError) instead, so a caller can skip it or raise it."""
    for lineno, line in enumerate(open_text(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            kind = "null" if row is None else type(row).__name__
            yield where, DataError(f"{where}: expected a JSON object, got {kind}")
            continue
        yield where, row


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", row) for each non-blank line; bad JSON raises DataError naming the line."""
    for where, row in iter_jsonl(path):
        if isinstance(row, DataError):
            raise row
        yield where, row


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    atomic_write_text(path, "".join(json.dumps(e.to_json()) + "\n" for e in examples))


def read_examples(path: str | os.PathLike) -> list[Example]:
    return [Example.from_json(row, where) for where, row in read_jsonl(path)]
