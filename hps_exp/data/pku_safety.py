"""PKU-SafeRLHF (https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF).

Rows: prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, better_response_id,
safer_response_id (+ harm-category / severity / source fields, ignored here). The preference comes
from `safer_response_id` or `better_response_id` (config `preference`). Safety labels are kept as
harmful = (not is_response_0_safe, not is_response_1_safe).

The prompt is put into the HH chat format and responses get a leading space, so a model trained on
one dataset sees the same format on the other:
    prompt = "\\n\\nHuman: {prompt}\\n\\nAssistant:", responses = (" " + response_0, " " + response_1)
(prompt and responses are stripped of surrounding whitespace first). Responses keep their order;
chosen = the preferred id, rejected = the other. A row whose two responses are the same text is bad.
"""
from __future__ import annotations

import os
from functools import partial

from .common import LoadedSplits, build_splits, check_choice, require_bool, require_int, require_str
from .schema import DataError, Example

PREFERENCES = ("safer", "better")


def format_prompt(prompt: str) -> str:
    return f"\n\nHuman: {prompt.strip()}\n\nAssistant:"


def parse_row(row: dict, where: str, preference: str = "safer") -> Example:
    prompt = require_str(row, "prompt", where)
    r0 = require_str(row, "response_0", where)
    r1 = require_str(row, "response_1", where)
    safe0 = require_bool(row, "is_response_0_safe", where)
    safe1 = require_bool(row, "is_response_1_safe", where)
    if r0.strip() == r1.strip():  # equal texts carry no preference
        raise DataError(f"{where}: fields 'response_0' and 'response_1' are the same text, so the row carries "
                        f"no preference")
    key = f"{preference}_response_id"
    pref = require_int(row, key, where)
    if pref not in (0, 1):
        raise DataError(f"{where}: field {key!r} must be 0 or 1, got {pref}")
    return Example(
        prompt=format_prompt(prompt),
        responses=(" " + r0.strip(), " " + r1.strip()),
        harmful=(not safe0, not safe1),
        chosen=pref,
        rejected=1 - pref,
        source=where,
    )


def load(
    hub_id: str = "PKU-Alignment/PKU-SafeRLHF",
    subset: str | None = None,
    path: str | os.PathLike | None = None,
    test_path: str | os.PathLike | None = None,
    preference: str = "safer",
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.1,
    on_bad_row: str = "error",
    seed: int = 0,
    allow_overlap: bool = False,
) -> LoadedSplits:
    """PKU-SafeRLHF with preference "safer" or "better"; local files or, without path, the hub
    (`subset` is passed as the hub's data_dir)."""
    check_choice("dataset.preference", preference, PREFERENCES)
    return build_splits(
        partial(parse_row, preference=preference),
        name="pku_safety",
        path=path, test_path=test_path, hub_id=hub_id, data_dir=subset,
        train_split=train_split, test_split=test_split, test_fraction=test_fraction, seed=seed,
        max_train=max_train, max_test=max_test, on_bad_row=on_bad_row, allow_overlap=allow_overlap,
    )
