"""Multi-response JSONL with per-response rewards.

Two row formats, told apart by their keys (one file may mix them):
- the HPS authors' release: {"prompt": str, "responses": [str, ...], "rewards": [float, ...]}
  -> scores = rewards, chosen = Example.best (argmax, first index on ties), rejected = Example.worst
  (argmin, LAST index on ties, as sampler=best_worst and augmentation pick it);
- this project's own schema (`Example.to_json()`): {"prompt", "responses", "scores" (list or null),
  "harmful" (list or null), "chosen", "rejected"}; chosen/rejected are kept as written
  (default 0/1 when absent, as in Example.from_json).
In both formats a row whose scores all tie has no negative (no response scored below the best), so it
carries no preference and is bad at load time (error or counted skip, per dataset.on_bad_row), not
a crash later in training.
An optional "harmful" list of booleans is kept in both formats. Prompts are used as written.
"""
from __future__ import annotations

import os
from dataclasses import replace

from .common import (
    LoadedSplits,
    as_bool_list,
    as_number_list,
    as_str_list,
    build_splits,
    require,
    require_int,
    require_str,
)
from .schema import DataError, Example


def parse_row(row: dict, where: str) -> Example:
    prompt = require_str(row, "prompt", where)
    responses = as_str_list(require(row, "responses", where), "responses", where)
    n = len(responses)
    if n < 2:
        raise DataError(f"{where}: field 'responses' needs at least 2 responses, got {n}")
    harmful = row.get("harmful")
    if harmful is not None:
        harmful = as_bool_list(harmful, "harmful", where)
        if len(harmful) != n:
            raise DataError(f"{where}: {len(harmful)} harmful labels for {n} responses")

    if "rewards" in row and "scores" in row:
        raise DataError(f"{where}: has both 'rewards' (authors' format) and 'scores' (hps-exp format); keep one")
    if "rewards" in row:
        key, scores = "rewards", as_number_list(row["rewards"], "rewards", where)
        chosen = rejected = None  # from the scores, below
    elif "scores" in row:
        key, scores = "scores", row["scores"]
        if scores is not None:
            scores = as_number_list(scores, "scores", where)
        chosen = require_int(row, "chosen", where) if "chosen" in row else 0
        rejected = require_int(row, "rejected", where) if "rejected" in row else 1
    else:
        raise DataError(f"{where}: missing field 'rewards' (authors' format) or 'scores' (hps-exp format)")
    if scores is not None and len(scores) != n:
        raise DataError(f"{where}: {len(scores)} {key} for {n} responses")

    example = Example(
        prompt=prompt,
        responses=tuple(responses),
        scores=None if scores is None else tuple(scores),
        harmful=None if harmful is None else tuple(harmful),
        chosen=0 if chosen is None else chosen,
        rejected=1 if rejected is None else rejected,
        source=where,
    )
    if scores is not None and example.num_negatives == 0:
        raise DataError(f"{where}: all {key} are equal ({scores[0]!r}), so no response is preferred")
    if chosen is None:
        example = replace(example, chosen=example.best, rejected=example.worst)
    return example


def load(
    path: str | os.PathLike,
    test_path: str | os.PathLike | None = None,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    on_bad_row: str = "error",
    seed: int = 0,
    allow_overlap: bool = False,
) -> LoadedSplits:
    """Local ranked JSONL (.jsonl / .jsonl.gz); path alone is split by prompt (test_fraction, seed)."""
    if path is None:
        raise DataError("dataset.path is required (a .jsonl or .jsonl.gz file)")
    return build_splits(
        parse_row,
        name="ranked_jsonl",
        path=path, test_path=test_path, hub_id=None, test_fraction=test_fraction, seed=seed,
        max_train=max_train, max_test=max_test, on_bad_row=on_bad_row, allow_overlap=allow_overlap,
    )
