"""Multi-response JSONL with per-response rewards.

Two row formats, told apart by their keys (one file may mix them):
- the HPS authors' release: {"prompt": str, "responses": [str, ...], "rewards": [float, ...]}
  -> scores = rewards, chosen = argmax reward (first on ties), rejected = argmin (first on ties);
  all-equal rewards give no preference and make the row bad;
- this project's own schema (`Example.to_json()`): {"prompt", "responses", "scores" (list or null),
  "harmful" (list or null), "chosen", "rejected"}; chosen/rejected are kept as written
  (default 0/1 when absent, as in Example.from_json).
An optional "harmful" list of booleans is kept in both formats. Prompts are used as written.
"""
from __future__ import annotations

import os

from .common import (LoadedSplits, as_bool_list, as_number_list, as_str_list, build_splits, require,
                     require_int, require_str)
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
        rewards = as_number_list(row["rewards"], "rewards", where)
        if len(rewards) != n:
            raise DataError(f"{where}: {len(rewards)} rewards for {n} responses")
        chosen = max(range(n), key=lambda i: (rewards[i], -i))
        rejected = min(range(n), key=lambda i: (rewards[i], i))
        if rewards[chosen] == rewards[rejected]:
            raise DataError(f"{where}: all rewards are equal, so no response is preferred")
        scores = tuple(rewards)
    elif "scores" in row:
        scores = row["scores"]
        if scores is not None:
            scores = as_number_list(scores, "scores", where)
            if len(scores) != n:
                raise DataError(f"{where}: {len(scores)} scores for {n} responses")
            scores = tuple(scores)
        chosen = require_int(row, "chosen", where) if "chosen" in row else 0
        rejected = require_int(row, "rejected", where) if "rejected" in row else 1
    else:
        raise DataError(f"{where}: missing field 'rewards' (authors' format) or 'scores' (hps-exp format)")

    return Example(
        prompt=prompt,
        responses=tuple(responses),
        scores=scores,
        harmful=None if harmful is None else tuple(harmful),
        chosen=chosen,
        rejected=rejected,
        source=where,
    )


def load(
    path: str | os.PathLike,
    test_path: str | os.PathLike | None = None,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    on_bad_row: str = "error",
    seed: int = 0,
    allow_overlap: bool = False,
    name: str | None = None,
) -> LoadedSplits:
    """Local ranked JSONL (.jsonl / .jsonl.gz); path alone is split by prompt (test_fraction, seed)."""
    if path is None:
        raise DataError("dataset.path is required (a .jsonl or .jsonl.gz file)")
    return build_splits(
        parse_row,
        name=name or "ranked_jsonl",
        path=path, test_path=test_path, hub_id=None, test_fraction=test_fraction, seed=seed,
        max_train=max_train, max_test=max_test, on_bad_row=on_bad_row, allow_overlap=allow_overlap,
    )
