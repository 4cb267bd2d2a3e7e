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
import zlib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

from hps_exp.io import atomic_write_text


class DataError(ValueError):
    """Bad input data; the message names the file and line (or the config key)."""


FLOAT32_MAX = 3.4028234663852886e38


def _check_unicode(text: str, name: str, where: str) -> None:
    """Text must be valid Unicode: a lone surrogate (JSON's "\ud800") cannot be encoded, and the tokenizer dies
    on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {name} holds a lone surrogate {text[e.start]!r} at character {e.start} "
                        f"(not valid Unicode text)") from None


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
        for name, text in (("prompt", self.prompt), *((f"response {i}", r) for i, r in enumerate(self.responses))):
            _check_unicode(text, name, where)
        if self.scores is not None and len(self.scores) != n:
            raise DataError(f"{where}: {len(self.scores)} scores for {n} responses")
        for i, v in enumerate(self.scores or ()):
            if not abs(v) <= FLOAT32_MAX:   # NaN too
                raise DataError(f"{where}: score {i} = {v!r} is not a finite float32 (|score| <= {FLOAT32_MAX:.3g}); "
                                f"training computes in float32")
        if self.harmful is not None and len(self.harmful) != n:
            raise DataError(f"{where}: {len(self.harmful)} harmful labels for {n} responses")
        if not (0 <= self.chosen < n and 0 <= self.rejected < n and self.chosen != self.rejected):
            raise DataError(f"{where}: chosen={self.chosen}, rejected={self.rejected} invalid for {n} responses")

    @property
    def n(self) -> int:
        return len(self.responses)

    # The one definition of best / worst / negatives (samplers, losses, evaluation, augmentation and
    # loaders all use these). Rules: best = FIRST index of the top score, worst = LAST index of the
    # bottom score (so best != worst even when every score ties); a negative is a response scored
    # STRICTLY below the best, so a response tied with the best is never a negative. Without scores the
    # dataset's (chosen, rejected) pair is the preference.

    @property
    def best(self) -> int:
        """Index of the preferred response: argmax score (first index on ties), else `chosen`."""
        scores = self.scores
        if scores is None:
            return self.chosen
        return max(range(self.n), key=lambda i: (scores[i], -i))

    @property
    def worst(self) -> int:
        """Index of the least preferred response: argmin score (LAST index on ties), else `rejected`."""
        scores = self.scores
        if scores is None:
            return self.rejected
        return max(range(self.n), key=lambda i: (-scores[i], i))

    # cached_property stores into the instance __dict__ without __setattr__, so it works on this frozen
    # (non-slots) dataclass; the value depends only on frozen fields, so it never goes stale.
    @cached_property
    def negatives(self) -> tuple[int, ...]:
        """Indices scored strictly below the best score, by decreasing score (ties by index).
        Without scores: every index but `chosen`, in index order. Empty when every score ties."""
        scores = self.scores
        if scores is None:
            return tuple(i for i in range(self.n) if i != self.chosen)
        top = max(scores)
        return tuple(sorted((i for i in range(self.n) if scores[i] < top), key=lambda i: (-scores[i], i)))

    @property
    def num_negatives(self) -> int:
        return len(self.negatives)

    @property
    def hardest(self) -> int:
        """The highest-scored negative (negatives[0]); `rejected` without scores.
        DataError naming the row when every score ties (there is no negative)."""
        if self.scores is None:
            return self.rejected
        if not self.negatives:
            raise DataError(f"{self.source or 'example'}: every score ties ({self.scores[0]!r}), so no response "
                            f"is a negative")
        return self.negatives[0]

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
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{source or 'row'}: {type(e).__name__}: {e}") from None


@dataclass
class Splits:
    """What a dataset loader returns."""
    train: list[Example]
    test: list[Example]
    name: str = ""


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | DataError]]:
    """(line number, text) for each line of a .jsonl or .jsonl.gz file.

    Lines are read as bytes and decoded one by one, so an invalid UTF-8 byte spoils only its own line:
    that line yields a DataError naming file:line (a caller may skip it) instead of killing the read.
    A file that cannot be read to its end (a truncated or corrupt .gz, an I/O error) raises DataError
    naming the file and the last line reached: a partial file is never accepted, whatever the bad-row mode.
    """
    p, name = Path(path), os.fspath(path)  # messages use the path as given, like iter_jsonl's "file:line"
    if not p.is_file():
        raise DataError(f"{name}: {'is a directory, not a .jsonl file' if p.is_dir() else 'file not found'}")
    opener = gzip.open if p.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    # utf-8-sig on line 1: a byte-order mark some editors write is not part of the JSON.
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, DataError(f"{name}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                                            f"column {e.start + 1})")
    except (EOFError, zlib.error, OSError) as e:
        reached = f"after line {lineno}" if lineno else "before the first line"
        if isinstance(e, EOFError):
            what = "file is truncated (the compressed stream ends early)"
        elif isinstance(e, (zlib.error, gzip.BadGzipFile)):
            what = f"file is not valid gzip data ({e})"
        elif not lineno:  # could not even start (permissions, ...): nothing partial about it
            raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e})") from None
        else:
            what = f"file could not be read to its end ({type(e).__name__}: {e})"
        raise DataError(f"{name}: {what}, {reached}; a partial file is never loaded, not even with "
                        f"dataset.on_bad_row=skip: re-download or re-create it") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict | DataError]]:
    """("file:line", row) for each non-blank line; a line that is not a JSON object (or not UTF-8)
    yields ("file:line", DataError) instead, so a caller can skip it or raise it."""
    for lineno, line in iter_lines(path):
        where = f"{path}:{lineno}"
        if isinstance(line, DataError):
            yield where, line
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(f"{where}: not valid JSON ({e.msg})")
            continue
        except (ValueError, RecursionError) as e:  # e.g. an integer over Python's digit limit, deep nesting
            yield where, DataError(f"{where}: not usable JSON ({type(e).__name__}: {str(e)[:200]})")
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


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    atomic_write_text(path, "".join(json.dumps(e.to_json()) + "\n" for e in examples))


def read_examples(path: str | os.PathLike) -> list[Example]:
    return [Example.from_json(row, where) for where, row in read_jsonl(path)]
