"""Anthropic HH-RLHF (https://huggingface.co/datasets/Anthropic/hh-rlhf).

Each row is {"chosen": transcript, "rejected": transcript}; a transcript is a run of
"\\n\\nHuman: …" / "\\n\\nAssistant: …" turns. The prompt is everything up to and including the
last "\\n\\nAssistant:" (so earlier turns stay in the prompt); the response is the rest, leading
space kept. Both transcripts must share that prompt, and the two responses must differ (beyond
surrounding whitespace), otherwise the row is bad.

    Example(prompt, (chosen_response, rejected_response), scores=None, harmful=None,
            chosen=0, rejected=1, source="file:line")
"""
from __future__ import annotations

import os

from .common import LoadedSplits, build_splits, require_str
from .schema import DataError, Example

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def split_transcript(text: str, key: str, where: str) -> tuple[str, str]:
    """(prompt, response) of one HH transcript; DataError if it is not one."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise DataError(f"{where}: field {key!r} is not an HH transcript (no {ASSISTANT!r} turn)")
    if not text.startswith(HUMAN):
        raise DataError(f"{where}: field {key!r} is not an HH transcript (does not start with {HUMAN!r})")
    cut = i + len(ASSISTANT)
    return text[:cut], text[cut:]


def parse_row(row: dict, where: str) -> Example:
    chosen = require_str(row, "chosen", where)
    rejected = require_str(row, "rejected", where)
    prompt, chosen_resp = split_transcript(chosen, "chosen", where)
    prompt_r, rejected_resp = split_transcript(rejected, "rejected", where)
    if prompt != prompt_r:
        k = next((j for j, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise DataError(
            f"{where}: chosen and rejected have different prompts (before the last {ASSISTANT!r}); "
            f"first difference at character {k}: {prompt[k:k + 40]!r} vs {prompt_r[k:k + 40]!r}"
        )
    for key, resp in (("chosen", chosen_resp), ("rejected", rejected_resp)):
        if not resp.strip():
            raise DataError(f"{where}: {key} response (after the last {ASSISTANT!r}) is empty")
    # Equal texts (up to surrounding whitespace) carry no preference: training on them is pure noise.
    if chosen_resp.strip() == rejected_resp.strip():
        raise DataError(f"{where}: chosen and rejected responses are the same text, so the row carries no preference")
    return Example(prompt=prompt, responses=(chosen_resp, rejected_resp), chosen=0, rejected=1, source=where)


def load(
    hub_id: str = "Anthropic/hh-rlhf",
    subset: str | None = "harmless-base",
    path: str | os.PathLike | None = None,
    test_path: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    test_fraction: float = 0.1,
    on_bad_row: str = "error",
    seed: int = 0,
    allow_overlap: bool = False,
) -> LoadedSplits:
    """HH-RLHF from local files (path [+ test_path]; path alone is split by prompt with
    test_fraction/seed) or, without path, from the hub (`subset` is the hub's data_dir)."""
    return build_splits(
        parse_row,
        name="hh_rlhf",
        path=path, test_path=test_path, hub_id=hub_id, data_dir=subset,
        train_split=train_split, test_split=test_split, test_fraction=test_fraction, seed=seed,
        max_train=max_train, max_test=max_test, on_bad_row=on_bad_row, allow_overlap=allow_overlap,
    )
