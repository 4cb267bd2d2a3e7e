"""Fuzzing the real-data loaders (issue 11, "Fuzzing as a permanent test").

For every loader (hh_rlhf, pku_safety, ranked_jsonl, through its public `load(path=...)`) hypothesis writes a
file of mostly-valid rows mutated in every way we could think of: missing keys, wrong types, empty strings,
huge / NaN / inf numbers, non-object JSON, random and invalid-UTF-8 bytes, digit-limit integers, deep nesting,
blank lines, gzip, truncated gzip; sometimes a second file as dataset.test_path, else the file is split by
prompt. Each case is loaded in both bad-row modes, and the outcome must be one of:

- success: every non-blank line is an example or (skip mode) a counted skip; error mode skips nothing;
- a DataError naming the file, and, for a row problem, "file:line" of a non-blank line; skip mode raises
  only file-level errors (truncated file, no usable rows, too few prompts to split, train/test overlap);
  if error mode loads, skip mode loads the same rows;

never another exception type, never a hang (hypothesis `deadline` bounds each example).

Budget: HPS_EXP_FUZZ_EXAMPLES examples per loader (default 30, a few seconds for the file); run longer (and see
the mix of outcomes with --hypothesis-show-statistics) with
    HPS_EXP_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz_loaders.py
"""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hps_exp.data import hh_rlhf, pku_safety, ranked_jsonl
from hps_exp.data.schema import DataError

MAX_EXAMPLES = int(os.environ.get("HPS_EXP_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=timedelta(seconds=5),  # generous for a shared CPU; a real case takes milliseconds
    database=None,                  # no .hypothesis/ dir in the repo; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- values

texts = st.text(max_size=12) | st.sampled_from(["", " ", "\n\t", "\n\nHuman:", "\n\nAssistant:", "\ud800"])
numbers = (st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, -1, 2, 0.5]))
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=10).filter(str.strip)


@st.composite
def hh_valid(draw) -> dict:
    prompt = f"\n\nHuman: {draw(words)}\n\nAssistant:"
    return {"chosen": prompt + " " + draw(words), "rejected": prompt + " " + draw(words)}


@st.composite
def pku_valid(draw) -> dict:
    return {"prompt": draw(words), "response_0": draw(words), "response_1": draw(words),
            "is_response_0_safe": draw(st.booleans()), "is_response_1_safe": draw(st.booleans()),
            "better_response_id": draw(st.sampled_from([0, 1])), "safer_response_id": draw(st.sampled_from([0, 1]))}


@st.composite
def ranked_valid(draw) -> dict:
    n = draw(st.integers(2, 4))
    row = {"prompt": draw(words), "responses": [draw(words) for _ in range(n)]}
    values = [draw(st.floats(-5, 5) | st.integers(-3, 3)) for _ in range(n)]
    if draw(st.booleans()):
        row["rewards"] = values
    else:
        row["scores"] = draw(st.none() | st.just(values))
        row["chosen"], row["rejected"] = draw(st.permutations(range(n)))[:2]
    if draw(st.booleans()):
        row["harmful"] = [draw(st.booleans()) for _ in range(n)]
    return row


@st.composite
def mutated(draw, valid: st.SearchStrategy) -> dict:
    """A valid row with 0-2 mutations: key removed, value replaced, list item replaced, key added."""
    row = draw(valid)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(row) + ["extra"]))
        how = draw(st.sampled_from(["drop", "replace", "empty", "item", "copy"]))
        if how == "drop":
            row.pop(key, None)
        elif how == "replace":
            row[key] = draw(json_values)
        elif how == "empty":
            row[key] = draw(st.sampled_from(["", "   ", [], {}, None]))
        elif how == "item" and isinstance(row.get(key), list) and row[key]:
            row[key][draw(st.integers(0, len(row[key]) - 1))] = draw(json_values)
        elif how == "copy" and row:  # one field's value into another (e.g. chosen == rejected)
            row[key] = row[draw(st.sampled_from(sorted(row)))]
    return row


def line_of(valid: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    rows = mutated(valid).map(lambda r: json.dumps(r, allow_nan=True).encode())

    @st.composite
    def bad_byte(draw) -> bytes:
        line = draw(rows)
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + line[at:]

    valid_rows = valid.map(lambda r: json.dumps(r).encode())
    return st.one_of(
        valid_rows, valid_rows, valid_rows, valid_rows, valid_rows,  # enough good rows that files load
        rows, rows, rows,                                          # rows the parser gets to see
        bad_byte(),
        json_values.map(lambda v: json.dumps(v).encode()),        # non-object JSON (and the odd object)
        st.binary(max_size=24),                                   # random bytes
        st.sampled_from([b"", b"   ", b"{", b"}", b"null", b"[" * 50_000, b'{"a": ' + b"9" * 5000 + b"}",
                         b"NaN", b'{"prompt": Infinity}', b"\xef\xbb\xbf{}"]),
    ).map(lambda b: b.replace(b"\n", b" "))                       # one generated line = one file line


@dataclass(frozen=True)
class FileCase:
    lines: list[bytes]
    gz: bool
    cut: float | None   # a .gz cut at this fraction of its bytes (truncated), or None


@dataclass(frozen=True)
class Case:
    train: FileCase
    test: FileCase | None   # dataset.test_path, or None: the train file is split by prompt
    test_fraction: float


@st.composite
def file_cases(draw, valid: st.SearchStrategy) -> FileCase:
    gz = draw(st.booleans())
    cut = draw(st.sampled_from([None] * 4) | st.floats(0.0, 0.999)) if gz else None
    return FileCase(draw(st.lists(line_of(valid), min_size=1, max_size=8)), gz, cut)


@st.composite
def cases(draw, valid: st.SearchStrategy) -> Case:
    test = draw(st.none() | file_cases(valid))
    return Case(draw(file_cases(valid)), test, draw(st.sampled_from([0.0, 0.0, 0.5])))


# ----------------------------------------------------------------------------- the oracle

def is_blank(line: bytes, first: bool) -> bool:
    try:
        return not line.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return False


def write_file(path: Path, case: FileCase) -> set[int]:
    """Write the file; return its non-blank line numbers (the rows a loader must account for)."""
    data = b"\n".join(case.lines) + b"\n"
    if case.gz:
        data = gzip.compress(data)
        if case.cut is not None:
            data = data[: max(1, int(case.cut * len(data)))]
    path.write_bytes(data)
    return {i for i, line in enumerate(case.lines, start=1) if not is_blank(line, i == 1)}


def line_of_source(source: str, nonblank: dict[str, set[int]]) -> None:
    file, line = source.rsplit(":", 1)
    assert int(line) in nonblank[file], source


def check_loader(load, case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        suffix = lambda c: ".jsonl.gz" if c.gz else ".jsonl"  # noqa: E731
        train_path = str(Path(tmp) / ("train" + suffix(case.train)))
        test_path = None if case.test is None else str(Path(tmp) / ("test" + suffix(case.test)))
        nonblank = {train_path: write_file(Path(train_path), case.train)}
        if test_path:
            nonblank[test_path] = write_file(Path(test_path), case.test)
        row_error = re.compile("(" + "|".join(re.escape(p) for p in nonblank) + r"):(\d+): ")

        outcome = {}
        for mode in ("error", "skip"):
            try:
                outcome[mode] = load(path=train_path, test_path=test_path, on_bad_row=mode,
                                     test_fraction=case.test_fraction)
            except DataError as e:
                msg = str(e)
                m = row_error.match(msg)
                if m:  # a row problem: names a real, non-blank line, and only in error mode
                    assert mode == "error", f"skip mode raised a row error: {msg}"
                    assert int(m.group(2)) in nonblank[m.group(1)], msg
                elif msg.startswith("prompt "):  # train/test overlap: names a row of each file
                    assert test_path and f"train ({train_path}:" in msg and f"test ({test_path}:" in msg, msg
                else:
                    assert any(msg.startswith(p + ": ") for p in nonblank), f"error does not name the file: {msg}"
                outcome[mode] = e

        strict, lenient = outcome["error"], outcome["skip"]
        for mode, result in outcome.items():  # shown by --hypothesis-show-statistics: is the mix useful?
            kind = "loaded" if not isinstance(result, DataError) else "row error" if row_error.match(str(result)) \
                else "file error"
            if kind == "file error":  # which one: truncated, no usable rows, too few prompts, overlap
                msg = str(result)
                kind += ": " + ("overlap" if msg.startswith("prompt ") else msg.split(": ", 1)[-1][:15])
            event(f"{mode}: {kind}")
        cut = [c for c in (case.train, case.test) if c is not None and c.cut is not None]
        if cut:  # a truncated file is never loaded (error mode may stop at a bad row first)
            assert isinstance(strict, DataError), strict
            assert isinstance(lenient, DataError), lenient
            if case.train.cut is not None:
                assert "never loaded" in str(lenient), lenient
            return
        n_train = len(nonblank[train_path])
        n_test = len(nonblank[test_path]) if test_path else 0
        if not isinstance(strict, DataError):
            assert strict.skipped == {"train": 0, "test": 0}
            assert len(strict.train) + len(strict.test) == n_train + n_test
            if test_path:
                assert len(strict.test) == n_test
            assert not isinstance(lenient, DataError), lenient
            assert [e.source for e in lenient.train + lenient.test] == [e.source for e in strict.train + strict.test]
        if not isinstance(lenient, DataError):
            if test_path:
                assert len(lenient.train) + lenient.skipped["train"] == n_train
                assert len(lenient.test) + lenient.skipped["test"] == n_test
            else:
                assert len(lenient.train) + len(lenient.test) + lenient.skipped["train"] == n_train
                assert lenient.skipped["test"] == 0
            for e in lenient.train + lenient.test:
                line_of_source(e.source, nonblank)


# ----------------------------------------------------------------------------- one test per loader

@FUZZ
@given(cases(hh_valid()))
def test_fuzz_hh_rlhf(case):
    check_loader(hh_rlhf.load, case)


@FUZZ
@given(cases(pku_valid()))
def test_fuzz_pku_safety(case):
    check_loader(pku_safety.load, case)


@FUZZ
@given(cases(ranked_valid()))
def test_fuzz_ranked_jsonl(case):
    check_loader(ranked_jsonl.load, case)


@pytest.mark.parametrize("load,valid", [(hh_rlhf.load, hh_valid()), (pku_safety.load, pku_valid()),
                                        (ranked_jsonl.load, ranked_valid())], ids=["hh", "pku", "ranked"])
def test_oracle_accepts_valid_rows(load, valid):
    """The generators' valid rows do load (else the fuzz would only ever test rejection)."""
    @settings(max_examples=10, deadline=None, database=None)
    @given(st.lists(valid, min_size=1, max_size=5))
    def run(rows):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ok.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            try:
                s = load(path=str(path), test_fraction=0.0)
            except DataError as e:  # a generated valid row may still tie or repeat a response
                assert re.search(r"(same text|are equal)", str(e)), str(e)
                return
            assert len(s.train) == len(rows)
    run()
