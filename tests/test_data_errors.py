"""Example's one definition of best / worst / negatives, and loader robustness on broken files and rows
(issue 11 items 6 and 8): truncated or corrupt .gz, invalid UTF-8, rows that carry no preference."""
from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path

import pytest

from hps_exp.data import hh_rlhf, pku_safety, ranked_jsonl
from hps_exp.data.schema import DataError, Example

MODES = ("error", "skip")


def ex(scores=None, n=None, chosen=0, rejected=1, source="t.jsonl:7") -> Example:
    n = n or len(scores)
    return Example("p", tuple(f"r{i}" for i in range(n)), scores=None if scores is None else tuple(scores),
                   chosen=chosen, rejected=rejected, source=source)


# ----------------------------------------------------------------------------- best / worst / negatives

def test_members_with_distinct_and_tied_scores():
    e = ex([0.5, 2.0, -1.0, 2.0, -1.0, 0.5])
    assert e.best == 1            # first of the tied maxima (1, 3)
    assert e.worst == 4           # LAST of the tied minima (2, 4)
    assert e.negatives == (0, 5, 2, 4)   # strictly below 2.0, decreasing score, ties by index; 3 is no negative
    assert e.hardest == 0 and e.num_negatives == 4


def test_members_when_every_score_ties():
    e = ex([1.0, 1.0, 1.0])
    assert (e.best, e.worst) == (0, 2)  # still two different responses
    assert e.negatives == () and e.num_negatives == 0
    with pytest.raises(DataError, match=r"t\.jsonl:7\b.*\btie.*\b1\.0\b"):
        _ = e.hardest  # the property access itself must raise


def test_members_best_unique_rest_tied():
    e = ex([0.0, 0.0, 5.0, 0.0])
    assert (e.best, e.worst, e.hardest) == (2, 3, 0)
    assert e.negatives == (0, 1, 3)


def test_members_without_scores_follow_chosen_and_rejected():
    e = ex(n=4, chosen=2, rejected=3)
    assert (e.best, e.worst, e.hardest) == (2, 3, 3)
    assert e.negatives == (0, 1, 3) and e.num_negatives == 3  # every index but chosen, in index order
    pair = ex(n=2, chosen=1, rejected=0)
    assert (pair.best, pair.worst, pair.hardest, pair.negatives) == (1, 0, 0, (0,))


def test_negatives_cached_and_equality_unaffected():
    a, b = ex([3.0, 1.0, 2.0]), ex([3.0, 1.0, 2.0])
    assert a.negatives is a.negatives == (2, 1)
    assert a == b and hash(a) == hash(b)  # reading a cached member does not change identity or hash
    assert "negatives" not in a.to_json()


# ----------------------------------------------------------------------------- files that cannot be read whole

def hh_line(i: int, rng: random.Random) -> str:
    words = " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 8) for _ in range(30))
    return json.dumps({"chosen": f"\n\nHuman: q{i} {words}?\n\nAssistant: good {i}",
                       "rejected": f"\n\nHuman: q{i} {words}?\n\nAssistant: bad {i}"})


@pytest.fixture
def truncated_gz(tmp_path) -> tuple[Path, int]:
    """A .jsonl.gz cut in the middle of its compressed stream, and how many whole lines its prefix holds."""
    rng = random.Random(0)
    text = "".join(hh_line(i, rng) + "\n" for i in range(2000)).encode()
    full = gzip.compress(text)
    cut = full[: len(full) // 2]
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(cut)
    readable = zlib.decompressobj(wbits=31).decompress(cut)
    return path, readable.count(b"\n")


@pytest.mark.parametrize("mode", MODES)
def test_truncated_gz_is_a_data_error_in_both_modes(truncated_gz, mode):
    path, whole_lines = truncated_gz
    with pytest.raises(DataError) as err:
        hh_rlhf.load(path=str(path), on_bad_row=mode)
    msg = str(err.value)
    assert re.match(rf"{re.escape(str(path))}\b.*\btruncated\b", msg), msg
    reached = int(re.search(r"\bline (\d+)\b", msg).group(1))
    assert 0 < reached <= whole_lines
    assert "dataset.on_bad_row=skip" in msg      # names the setting that does not help


@pytest.mark.parametrize("mode", MODES)
def test_not_gzip_and_corrupt_gzip(tmp_path, mode):
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_text(hh_line(0, random.Random(0)) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(fake))}\b.*\bgzip\b") as err:
        hh_rlhf.load(path=str(fake), on_bad_row=mode)
    assert re.search(r"\bfirst line\b", str(err.value)), str(err.value)

    good = gzip.compress("".join(hh_line(i, random.Random(i)) + "\n" for i in range(50)).encode())
    broken = bytearray(good)
    broken[len(good) // 2] ^= 0xFF  # one flipped byte: bad deflate data or a CRC mismatch
    bad = tmp_path / "flipped.jsonl.gz"
    bad.write_bytes(bytes(broken))
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}\b") as err:
        hh_rlhf.load(path=str(bad), on_bad_row=mode)
    assert "dataset.on_bad_row" in str(err.value)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz"])
def test_invalid_utf8_names_the_line_and_skip_skips_it(tmp_path, name):
    rng = random.Random(1)
    lines = [hh_line(i, rng).encode() for i in range(5)]
    lines[2] = lines[2].replace(b"good 2", b"good \xff\xfe 2")
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3\b.*UTF-8.*\b0xff\b"):
        hh_rlhf.load(path=str(path), test_fraction=0.0)
    s = hh_rlhf.load(path=str(path), test_fraction=0.0, on_bad_row="skip")
    assert s.skipped == {"train": 1, "test": 0}
    assert [e.source for e in s.train] == [f"{path}:{i}" for i in (1, 2, 4, 5)]


def test_byte_order_mark_on_the_first_line_is_accepted(tmp_path):
    rng = random.Random(2)
    path = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + hh_line(0, rng).encode(), hh_line(1, rng).encode()])
    assert len(hh_rlhf.load(path=str(path), test_fraction=0.0).train) == 2


# ----------------------------------------------------------------------------- rows that carry no preference

def check_bad_row(load, path: Path, line: int, message: str, n_good: int) -> None:
    """In error mode: DataError naming file:line, then the regex `message`; in skip mode: the row is counted
    and dropped."""
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:{line}\b.*{message}"):
        load(path=str(path), test_fraction=0.0)
    s = load(path=str(path), test_fraction=0.0, on_bad_row="skip")
    assert s.skipped == {"train": 1, "test": 0} and len(s.train) == n_good


def hh_row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


@pytest.mark.parametrize("rejected", [" same answer", " same answer  ", "same answer"])
def test_hh_chosen_equal_to_rejected_is_bad(tmp_path, rejected):
    rows = [hh_row(f"\n\nHuman: q{i}?\n\nAssistant:", f" good {i}", f" bad {i}") for i in range(3)]
    rows.insert(1, hh_row("\n\nHuman: q?\n\nAssistant:", " same answer", rejected))
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_bad_row(hh_rlhf.load, path, 2, r"\bchosen\b.*\brejected\b.*\bsame\b", 3)


def pku_row(r0: str, r1: str) -> dict:
    return {"prompt": "Is it safe?", "response_0": r0, "response_1": r1, "is_response_0_safe": True,
            "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}


def test_pku_equal_responses_are_bad(tmp_path):
    rows = [pku_row("Yes.", "No."), pku_row("Yes.", "No."), pku_row(" Same. ", "Same.")]
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_bad_row(pku_safety.load, path, 3, r"'response_0'.*'response_1'.*\bsame\b", 2)


GOOD_RANKED = [
    {"prompt": "p0", "responses": ["a", "b", "c"], "rewards": [1.0, 0.0, 2.0]},
    {"prompt": "p1", "responses": ["a", "b"], "scores": [0.5, 0.1], "chosen": 0, "rejected": 1},
]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "rewards": [1, 1, 1]}, r"\brewards\b.*\bequal\b.*\b1\.0\b"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 1]}, r"\bscores\b.*\bequal\b.*\b1\.0\b"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [-2.5, -2.5], "chosen": 1, "rejected": 0},
     r"\bscores\b.*\bequal\b.*-2\.5\b"),
])
def test_ranked_all_tied_scores_are_bad_at_load_time(tmp_path, row, message):
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD_RANKED[0], row, GOOD_RANKED[1]]))
    check_bad_row(ranked_jsonl.load, path, 2, message, 2)


def test_ranked_pair_without_scores_is_still_a_preference(tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": None, "chosen": 1,
                                "rejected": 0}) + "\n")
    (e,) = ranked_jsonl.load(path=str(path), test_fraction=0.0).train
    assert (e.best, e.worst, e.negatives) == (1, 0, (0,))


# ----------------------------------------------------------------------------- JSON the parser chokes on

@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, ' + "9" * 400 + "]}",
     r"'rewards' item 1\b.*\btoo large\b"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, ' + "9" * 5000 + "]}", r"\bJSON\b.*\bValueError\b"),
    ("[" * 100_000 + "]" * 100_000, r"\bJSON\b.*\bRecursionError\b"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 1e999]}', r"'rewards' item 1\b.*\binf\b"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "chosen": ' + "9" * 300 + "}",
     "chosen=" + "9" * 300 + r", rejected=1\b.*\b2 responses\b"),
])
def test_ranked_extreme_json_is_a_named_bad_row(tmp_path, line, message):
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join([json.dumps(GOOD_RANKED[0]), line, json.dumps(GOOD_RANKED[1])]) + "\n")
    check_bad_row(ranked_jsonl.load, path, 2, message, 2)


def test_too_few_prompts_to_split_names_the_file(tmp_path):
    path = tmp_path / "one_prompt.jsonl"
    path.write_text(json.dumps(hh_row("\n\nHuman: q?\n\nAssistant:", " yes", " no")) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}\b.*\b1\b.*\bprompt"):
        hh_rlhf.load(path=str(path), test_fraction=0.5)


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}\b.*\bdirectory\b"):
        ranked_jsonl.load(path=str(tmp_path), on_bad_row="skip")


def test_messages_use_the_path_as_given(tmp_path):
    """Line errors from the byte reader and from the JSON parser name the file the same way."""
    write_lines(tmp_path / "x.jsonl", [b'{"prompt": "\xff"}', b"[1]"])
    given = f"{tmp_path}/./x.jsonl"  # Path() would drop the "/."
    with pytest.raises(DataError, match=rf"{re.escape(given)}:1\b.*UTF-8.*\b0xff\b.*\b13\b"):
        ranked_jsonl.load(path=given)
    with pytest.raises(DataError, match=rf"{re.escape(given)}\b.*\btraining\b.*\b2 bad\b"):
        ranked_jsonl.load(path=given, on_bad_row="skip")


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Results and shared cache entries must be readable like any file open() writes (mkstemp alone gives 0600)."""
    import os

    from hps_exp.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
