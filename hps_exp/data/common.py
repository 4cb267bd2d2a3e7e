"""Shared plumbing for the real-data loaders (hh_rlhf, pku_safety, ranked_jsonl).

A loader supplies one row-parsing function `parse(row: dict, where: str) -> Example` that raises
`DataError` ("file:line: reason") for a bad row; everything else lives here:

- reading rows from a local .jsonl / .jsonl.gz file (`iter_file_rows`) or from the Hugging Face
  hub (`iter_hub_rows`); both feed the same `parse`, so hub rows and local rows are checked alike;
- bad-row handling (`on_bad_row="error"` raises, `"skip"` drops, counts and logs them);
- a seeded, deterministic train/test split by prompt for a single local file (`split_by_prompt`);
- the train/test prompt-overlap check (`check_overlap`);
- `build_splits`, which ties these together and returns `LoadedSplits` (a `Splits` that also
  records how many rows were skipped per split).
"""
from __future__ import annotations

import logging
import math
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

from .schema import DataError, Example, Splits, iter_jsonl

log = logging.getLogger(__name__)

ON_BAD_ROW_OPTIONS = ("error", "skip")

RowParser = Callable[[dict, str], Example]
# A row is either a parsed JSON object or the DataError that reading it produced (bad JSON),
# so that "skip" mode can skip unreadable lines too.
Row = tuple[str, "dict | DataError"]


@dataclass
class LoadedSplits(Splits):
    """`Splits` plus bookkeeping: `skipped` = {"train": n, "test": m} bad rows dropped (skip mode)."""
    skipped: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- config checks

def check_choice(key: str, value: Any, options: Sequence[str]) -> str:
    """Return `value` if it is one of `options`, else a DataError naming the config key and options."""
    if value not in options:
        opts = ", ".join(repr(o) for o in options)
        raise DataError(f"{key}: must be one of {opts}; got {value!r}")
    return value


def check_on_bad_row(value: Any) -> str:
    return check_choice("dataset.on_bad_row", value, ON_BAD_ROW_OPTIONS)


def _check_limit(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{key}: must be a non-negative integer or null; got {value!r}")
    return value


def _check_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise DataError(f"dataset.test_fraction: must be a number in [0, 1); got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- row field checks

def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def require(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    return row[key]


def require_str(row: dict, key: str, where: str, *, nonempty: bool = True) -> str:
    v = require(row, key, where)
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_type_name(v)}")
    if nonempty and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def require_bool(row: dict, key: str, where: str) -> bool:
    v = require(row, key, where)
    if not isinstance(v, bool):
        raise DataError(f"{where}: field {key!r} must be true/false, got {_type_name(v)} {v!r}")
    return v


def require_int(row: dict, key: str, where: str) -> int:
    v = require(row, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{where}: field {key!r} must be an integer, got {_type_name(v)} {v!r}")
    return v


def as_str_list(v: Any, key: str, where: str) -> list[str]:
    if not isinstance(v, list):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {_type_name(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise DataError(f"{where}: field {key!r} item {i} must be a string, got {_type_name(s)}")
        if not s.strip():
            raise DataError(f"{where}: field {key!r} item {i} is empty")
    return v


def as_number_list(v: Any, key: str, where: str) -> list[float]:
    if not isinstance(v, list):
        raise DataError(f"{where}: field {key!r} must be a list of numbers, got {_type_name(v)}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise DataError(f"{where}: field {key!r} item {i} must be a number, got {_type_name(x)} {x!r}")
        try:
            value = float(x)  # OverflowError for an int beyond float range (JSON allows any digits)
        except OverflowError:
            raise DataError(f"{where}: field {key!r} item {i} is too large for a float "
                            f"({shorten(str(x), 40)})") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: field {key!r} item {i} is not finite ({x!r})")
        out.append(value)
    return out


def as_bool_list(v: Any, key: str, where: str) -> list[bool]:
    if not isinstance(v, list):
        raise DataError(f"{where}: field {key!r} must be a list of true/false, got {_type_name(v)}")
    for i, x in enumerate(v):
        if not isinstance(x, bool):
            raise DataError(f"{where}: field {key!r} item {i} must be true/false, got {_type_name(x)} {x!r}")
    return v


def shorten(text: str, n: int = 80) -> str:
    """repr() of text cut to about n characters, for error messages."""
    return repr(text if len(text) <= n else text[: n - 1] + "…")


# ----------------------------------------------------------------------------- row sources

def iter_file_rows(path: str | os.PathLike) -> Iterator[Row]:
    """("file:line", row) for each non-blank line of a .jsonl/.jsonl.gz file.

    Unlike schema.read_jsonl, a line that is not a JSON object yields ("file:line", DataError)
    instead of ending the iteration, so skip mode can step over it. A missing file raises at once.
    """
    yield from iter_jsonl(path)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing or changed
        return False


def _hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Fast connectivity probe of the hub endpoint, so an offline machine fails in milliseconds
    instead of after the hub client's retry loop (~25 s). Returns None when the hub looks reachable
    or when the probe does not apply (offline mode: the library may serve a cached copy; a proxy is
    configured: a direct connection says nothing)."""
    if _hub_offline():
        return None
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e}"
    return None


def hub_error(hub_id: str, reason: str, data_dir: str | None, split: str) -> DataError:
    where = f"data_dir={data_dir!r}, split={split!r}" if data_dir else f"split={split!r}"
    return DataError(
        f"could not load {hub_id!r} ({where}) from the Hugging Face hub ({reason}). "
        f"Offline? Point at local files: dataset.path=/path/train.jsonl.gz dataset.test_path=/path/test.jsonl.gz"
    )


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 300:
        msg = msg[:299] + "…"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def iter_hub_rows(hub_id: str, split: str, data_dir: str | None = None) -> list[Row]:
    """All rows of one hub split as ("hf:<hub_id>/<data_dir>/<split>:<row number>", row).

    Any failure to reach or read the hub becomes a DataError that says how to point at local files.
    """
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise hub_error(hub_id, reason, data_dir, split)
    try:
        import datasets  # imported lazily: slow, and only needed for hub loading
        ds = datasets.load_dataset(hub_id, data_dir=data_dir, split=split)
        rows = list(ds)
    except Exception as e:  # connection errors, missing repo/split, offline mode without a cache, ...
        raise hub_error(hub_id, _reason(e), data_dir, split) from None
    prefix = f"hf:{hub_id}/{data_dir}/{split}" if data_dir else f"hf:{hub_id}/{split}"
    out: list[Row] = []
    for i, row in enumerate(rows, start=1):
        where = f"{prefix}:{i}"
        out.append((where, row if isinstance(row, dict)
                    else DataError(f"{where}: expected a record, got {_type_name(row)}")))
    return out


# ----------------------------------------------------------------------------- parsing

def parse_rows(rows: Iterable[Row], parse: RowParser, *, on_bad_row: str, label: str) -> tuple[list[Example], int]:
    """Parse rows with `parse`; returns (examples, number skipped). `label` names the source in logs."""
    check_on_bad_row(on_bad_row)
    examples: list[Example] = []
    bad: list[str] = []
    total = 0
    for where, row in rows:
        total += 1
        try:
            if isinstance(row, DataError):
                raise row
            examples.append(parse(row, where))
        except DataError as e:
            if on_bad_row == "error":
                raise DataError(str(e)) from None
            bad.append(str(e))
            log.debug("skipping bad row: %s", e)
    if bad:
        shown = "; ".join(bad[:3]) + ("; …" if len(bad) > 3 else "")
        log.warning("skipped %d bad row(s) of %d in %s (on_bad_row=skip): %s", len(bad), total, label, shown)
    return examples, len(bad)


# ----------------------------------------------------------------------------- splitting / overlap

def split_by_prompt(examples: Sequence[Example], test_fraction: float, seed: int,
                    label: str = "") -> tuple[list[Example], list[Example]]:
    """Seeded, deterministic split with no prompt on both sides.

    Distinct prompts (in order of first appearance) are shuffled with random.Random(seed); the first
    round(test_fraction * n_prompts) of them (at least 1 when test_fraction > 0) go to test. Example
    order within each side follows the input.
    """
    prompts = list(dict.fromkeys(e.prompt for e in examples))
    if test_fraction <= 0:
        return list(examples), []
    if len(prompts) < 2:
        where = f"{label}: " if label else ""
        raise DataError(f"{where}cannot split {len(prompts)} distinct prompt(s) into train and test; "
                        f"give dataset.test_path (or dataset.test_fraction=0)")
    n_test = min(len(prompts) - 1, max(1, round(test_fraction * len(prompts))))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    test_prompts = set(prompts[:n_test])
    train = [e for e in examples if e.prompt not in test_prompts]
    test = [e for e in examples if e.prompt in test_prompts]
    return train, test


def check_overlap(train: Sequence[Example], test: Sequence[Example], allow_overlap: bool = False) -> int:
    """Number of prompts found in both splits; raises DataError on any unless allow_overlap."""
    first_train: dict[str, str] = {}
    for e in train:
        first_train.setdefault(e.prompt, e.source)
    shared: dict[str, tuple[str, str]] = {}
    for e in test:
        if e.prompt in first_train and e.prompt not in shared:
            shared[e.prompt] = (first_train[e.prompt], e.source)
    if shared and not allow_overlap:
        prompt, (src_train, src_test) = next(iter(shared.items()))
        more = f" (and {len(shared) - 1} more shared prompt(s))" if len(shared) > 1 else ""
        raise DataError(
            f"prompt {shorten(prompt.strip())} is in both train ({src_train}) and test ({src_test}){more}; "
            f"train/test must not share prompts (set dataset.allow_overlap=true to allow it)"
        )
    if shared:
        log.warning("%d prompt(s) are in both train and test (allowed by allow_overlap)", len(shared))
    return len(shared)


# ----------------------------------------------------------------------------- the whole pipeline

def launch_relative(path: str) -> str:
    """A relative path as seen from where the job was launched (like cache_dir), also when hydra.job.chdir=true
    moved the job into its run dir; otherwise the path as given (messages name it so)."""
    if os.path.isabs(path):
        return path
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    if HydraConfig.initialized() and os.path.realpath(get_original_cwd()) != os.path.realpath(os.getcwd()):
        return os.path.join(get_original_cwd(), path)
    return path


def build_splits(
    parse: RowParser,
    *,
    name: str,
    path: str | os.PathLike | None = None,
    test_path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    on_bad_row: str = "error",
    allow_overlap: bool = False,
) -> LoadedSplits:
    """Load train/test from local files (path [+ test_path]) or, without path, from the hub."""
    check_on_bad_row(on_bad_row)
    max_train = _check_limit("dataset.max_train", max_train)
    max_test = _check_limit("dataset.max_test", max_test)
    if test_path is not None and path is None:
        raise DataError("dataset.test_path is set but dataset.path is not; give both (or neither, to use the hub)")

    def load_local(p: str | os.PathLike) -> tuple[list[Example], int]:
        p = launch_relative(os.path.expanduser(str(p)))
        return parse_rows(iter_file_rows(p), parse, on_bad_row=on_bad_row, label=p)

    def load_hub(hub_id: str, split: str) -> tuple[list[Example], int]:
        rows = iter_hub_rows(hub_id, split, data_dir)
        return parse_rows(rows, parse, on_bad_row=on_bad_row, label=f"{hub_id} [{split}]")

    if path is not None:
        train, n_bad_train = load_local(path)
        if not train:
            raise DataError(f"{path}: no usable training rows ({n_bad_train} bad row(s) skipped)")
        if test_path is not None:
            test, n_bad_test = load_local(test_path)
        else:
            train, test = split_by_prompt(train, _check_fraction(test_fraction), seed, label=str(path))
            n_bad_test = 0
    elif hub_id:
        train, n_bad_train = load_hub(hub_id, train_split)
        test, n_bad_test = load_hub(hub_id, test_split)
    else:
        raise DataError("dataset.path is required (a .jsonl or .jsonl.gz file)")

    if not train:
        raise DataError(f"{hub_id} [{train_split}]: no usable training rows ({n_bad_train} bad row(s) skipped)")
    if max_train is not None:
        train = train[:max_train]
    if max_test is not None:
        test = test[:max_test]
    check_overlap(train, test, allow_overlap)
    log.info("%s: %d train / %d test examples (%d / %d bad rows skipped)",
             name, len(train), len(test), n_bad_train, n_bad_test)
    return LoadedSplits(train=train, test=test, name=name, skipped={"train": n_bad_train, "test": n_bad_test})
