"""Real-data loaders: HH-RLHF (real test file when present), PKU-SafeRLHF, ranked JSONL,
bad-row handling, train/test overlap and hub-unreachable errors."""
from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from hps_exp.data import common, hh_rlhf, pku_safety, ranked_jsonl
from hps_exp.data.schema import DataError, Example, write_examples

REPO = Path(__file__).resolve().parent.parent
HH_TEST = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
# Rows of the real harmless-base test file that break the HH rules: an empty chosen response
# (the transcript ends in "\n\nAssistant: ") or chosen/rejected with different prompts.
HH_EMPTY_CHOSEN = {87, 517, 926, 1104}
HH_PROMPT_MISMATCH = {1255, 1689, 1951, 1953, 2037}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as-is, for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def hh(prompt_turns: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt_turns + chosen, "rejected": prompt_turns + rejected}


def hh_rows(n: int) -> list[dict]:
    return [hh(f"\n\nHuman: question {i}?\n\nAssistant:", f" good answer {i}", f" bad answer {i}") for i in range(n)]


def sources(examples) -> list[str]:
    return [e.source for e in examples]


# ----------------------------------------------------------------------------- real HH-RLHF file

@pytest.fixture(scope="module")
def hh_real():
    if not HH_TEST.exists():
        pytest.skip(f"real HH-RLHF file not found at {HH_TEST}")
    return hh_rlhf.load(path=str(HH_TEST), test_fraction=0.0, on_bad_row="skip")


def test_real_hh_every_row_accounted_for(hh_real):
    splits = hh_real
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        n_lines = sum(1 for line in f if line.strip())
    assert n_lines == 2312
    bad = HH_EMPTY_CHOSEN | HH_PROMPT_MISMATCH
    assert len(splits.train) == 2312 - len(bad) == 2303
    assert splits.test == []
    assert splits.skipped == {"train": len(bad), "test": 0}
    lines = {int(s.rsplit(":", 1)[1]) for s in sources(splits.train)}
    assert lines == set(range(1, 2313)) - bad
    for e in splits.train:
        assert e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:")
        assert e.scores is None and e.harmful is None and (e.chosen, e.rejected) == (0, 1)


def test_real_hh_strict_mode_names_first_bad_row():
    if not HH_TEST.exists():
        pytest.skip(f"real HH-RLHF file not found at {HH_TEST}")
    with pytest.raises(DataError, match=rf"{re.escape(str(HH_TEST))}:87\b.*\bchosen\b.*\bempty\b"):
        hh_rlhf.load(path=str(HH_TEST))


def test_real_hh_hand_checked_rows(hh_real):
    by_line = {int(e.source.rsplit(":", 1)[1]): e for e in hh_real.train}
    # Row 1: multi-turn (3 Human turns); earlier turns stay in the prompt.
    e = by_line[1]
    assert e.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking "
                               "for practical joke ideas?\n\nHuman: yep\n\nAssistant: Ok, I’ll give you a couple")
    assert e.prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert e.prompt.count("\n\nHuman:") == 3
    assert e.responses[0].startswith(" No, sorry!  All of these involve a pen")
    assert e.responses[1].startswith(" There are lots of funny things you can do with pens")
    assert e.responses[1].endswith("unzip their zipper. It’s really funny.")
    # Row 2: multi-turn; an earlier Assistant turn is part of the prompt, not a response.
    e = by_line[2]
    assert e.prompt.startswith("\n\nHuman: How much alcohol can I drink per day?\n\nAssistant: Alcohol is a depressant")
    assert "\n\nAssistant: That sounds like a great plan! I’ll keep an eye on you" in e.prompt
    assert e.prompt.endswith("I feel much better when I get drunk and consume a lot of alcohol.\n\nAssistant:")
    assert e.responses[0].startswith(" Sounds like alcohol is something you use to calm down")
    assert e.responses[1] == (" I’m glad that you’re enjoying your alcohol intake. Can I ask about how you feel "
                              "when you don’t drink alcohol?")
    # Row 5: single turn.
    e = by_line[5]
    assert e.prompt == "\n\nHuman: What will happen if I drive my car into the water?\n\nAssistant:"
    assert e.responses[0].startswith(" You may be asking about what will happen to your car when it enters the water")
    assert e.responses[1].startswith(" It’s not going to work, because cars are made to")


def test_real_hh_single_file_split_is_disjoint_and_deterministic(hh_real):
    a = hh_rlhf.load(path=str(HH_TEST), on_bad_row="skip", test_fraction=0.1, seed=0)
    b = hh_rlhf.load(path=str(HH_TEST), on_bad_row="skip", test_fraction=0.1, seed=0)
    c = hh_rlhf.load(path=str(HH_TEST), on_bad_row="skip", test_fraction=0.1, seed=1)
    train_p, test_p = {e.prompt for e in a.train}, {e.prompt for e in a.test}
    assert not train_p & test_p
    assert len(a.train) + len(a.test) == 2303
    n_prompts = len(train_p | test_p)
    assert len(test_p) == round(0.1 * n_prompts)
    assert sources(a.train) == sources(b.train) and sources(a.test) == sources(b.test)
    assert sources(a.test) != sources(c.test)
    # max_train / max_test take the first k of each split
    d = hh_rlhf.load(path=str(HH_TEST), on_bad_row="skip", max_train=7, max_test=3)
    assert sources(d.train) == sources(a.train)[:7] and sources(d.test) == sources(a.test)[:3]


# ----------------------------------------------------------------------------- HH fixtures

def test_hh_local_train_and_test_files(tmp_path):
    rows = [
        hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:", " A pun.", " No."),
        hh("\n\nHuman: how do I bake bread?\n\nAssistant:", " Mix flour.", " Don't."),
    ]
    train = write_jsonl(tmp_path / "train.jsonl.gz", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [hh("\n\nHuman: other?\n\nAssistant:", " yes", " no")])
    s = hh_rlhf.load(path=str(train), test_path=str(test))
    assert s.name == "hh_rlhf"
    assert [e.responses for e in s.train] == [(" A pun.", " No."), (" Mix flour.", " Don't.")]
    assert s.train[0].prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    assert s.train[0].source == f"{train}:1" and s.test[0].source == f"{test}:1"


# Each bad row's error names the field (or value) at fault and, where two differ only by the
# reason, one word of the reason -- not the sentence.
HH_BAD = [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, r"missing\b.*'rejected'"),
    ({"chosen": 3, "rejected": "\n\nHuman: a\n\nAssistant: b"}, r"'chosen'.*\bint\b"),
    ({"chosen": "", "rejected": "\n\nHuman: a\n\nAssistant: b"}, r"'chosen'.*\bempty\b"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "},
     r"\brejected\b.*\bempty\b"),
    ({"chosen": "Human: a, Assistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
     r"'chosen'.*\bHH\b.*Assistant:"),
    ({"chosen": "\n\nAssistant: b", "rejected": "\n\nAssistant: c"},
     r"'chosen'.*\bHH\b.*Human:"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"},
     r"\bchosen\b.*\brejected\b.*\bprompts?\b"),
    ('{"chosen": "\\n\\nHuman: a', r"\bvalid JSON\b"),
    ("[1, 2]", r"\bobject\b.*\blist\b"),
]


@pytest.mark.parametrize("bad,message", HH_BAD, ids=[re.sub(r"\W+", " ", m).strip() for _, m in HH_BAD])
def test_hh_bad_row_names_file_and_line(tmp_path, bad, message):
    good = hh_rows(3)
    path = write_jsonl(tmp_path / "x.jsonl", [good[0], good[1], bad, good[2]])
    with pytest.raises(DataError) as err:
        hh_rlhf.load(path=str(path), test_fraction=0.0)
    assert str(err.value).startswith(f"{path}:3: ")
    assert re.search(message, str(err.value)), str(err.value)


def test_hh_skip_mode_counts_and_logs(tmp_path, caplog):
    good = hh_rows(6)
    rows = good[:2] + [bad for bad, _ in HH_BAD] + good[2:]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hps_exp.data"):
        s = hh_rlhf.load(path=str(path), test_fraction=0.0, on_bad_row="skip")
    assert s.skipped == {"train": len(HH_BAD), "test": 0}
    assert [e.responses[0] for e in s.train] == [f" good answer {i}" for i in range(6)]
    assert re.search(rf"\b{len(HH_BAD)}\b.*\b{len(rows)}\b.*{re.escape(str(path))}", caplog.text), caplog.text
    assert re.search(rf"{re.escape(str(path))}:3\b.*'rejected'", caplog.text), caplog.text


def test_bad_config_values(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", hh_rows(4))
    with pytest.raises(DataError, match=r"dataset\.on_bad_row\b.*'error', 'skip'.*'ignore'"):
        hh_rlhf.load(path=str(path), on_bad_row="ignore")
    with pytest.raises(DataError, match=r"dataset\.test_path\b.*\bdataset\.path\b"):
        hh_rlhf.load(test_path=str(path))
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'nope.jsonl'))}\b.*\bnot found\b"):
        hh_rlhf.load(path=str(tmp_path / "nope.jsonl"), on_bad_row="skip")
    with pytest.raises(DataError, match=r"dataset\.max_train\b.*-1\b"):
        hh_rlhf.load(path=str(path), max_train=-1)
    with pytest.raises(DataError, match=r"dataset\.test_fraction\b.*\b1\.5\b"):
        hh_rlhf.load(path=str(path), test_fraction=1.5)
    with pytest.raises(DataError, match=r"bad\.jsonl\b.*\btraining\b.*\b1 bad\b"):
        hh_rlhf.load(path=str(write_jsonl(tmp_path / "bad.jsonl", ["[]"])), on_bad_row="skip")


def test_train_test_overlap_detected(tmp_path):
    shared = hh("\n\nHuman: the shared question, which is long enough to be cut in the message "
                "because it goes on and on\n\nAssistant:", " a", " b")
    train = write_jsonl(tmp_path / "train.jsonl", hh_rows(3) + [shared])
    test = write_jsonl(tmp_path / "test.jsonl", [hh_rows(5)[4], shared])
    with pytest.raises(DataError) as err:
        hh_rlhf.load(path=str(train), test_path=str(test))
    msg = str(err.value)
    assert "Human: the shared question" in msg and "…" in msg
    assert re.search(rf"\btrain\b.*{re.escape(str(train))}:4\b", msg), msg
    assert re.search(rf"\btest\b.*{re.escape(str(test))}:2\b", msg), msg
    assert "dataset.allow_overlap" in msg
    s = hh_rlhf.load(path=str(train), test_path=str(test), allow_overlap=True)
    assert len(s.train) == 4 and len(s.test) == 2


# ----------------------------------------------------------------------------- hub

def test_hub_unreachable_offline_mode(monkeypatch):
    """The real datasets call in offline mode (fast, deterministic): a DataError, not a traceback."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # in case it was imported before
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        hh_rlhf.load(hub_id="hps-exp-tests/no-such-dataset")
    msg = str(err.value)
    assert re.search(r"'hps-exp-tests/no-such-dataset'.*'harmless-base'.*'train'", msg), msg
    assert "dataset.path=" in msg and "dataset.test_path=" in msg


def test_hub_unreachable_fails_fast_without_calling_datasets(monkeypatch):
    """Not in offline mode and no network: the connectivity probe answers before any hub retries."""
    import datasets

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
              "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(common, "_hub_offline", lambda: False)

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_dataset should not be reached")

    monkeypatch.setattr(common.socket, "create_connection", no_network)
    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    with pytest.raises(DataError) as err:
        pku_safety.load()
    msg = str(err.value)
    assert re.search(r"'PKU-Alignment/PKU-SafeRLHF'.*'train'", msg), msg
    assert "huggingface.co:443" in msg and "Name or service not known" in msg     # the host and the OS's reason
    assert "dataset.path=" in msg


def test_hub_rows_use_same_parser(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, data_dir=None, split=None, **kwargs):
        calls.append((hub_id, data_dir, split))
        rows = hh_rows(4) if split == "train" else [hh("\n\nHuman: t?\n\nAssistant:", " y", " n"), {"chosen": "x"}]
        return rows

    monkeypatch.setattr(common, "_hub_unreachable_reason", lambda timeout=5.0: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError,
                       match=r"hf:Anthropic/hh-rlhf/helpful-base/test:2\b.*'rejected'"):
        hh_rlhf.load(subset="helpful-base")
    s = hh_rlhf.load(subset="helpful-base", on_bad_row="skip", max_train=2)
    assert calls[-2:] == [("Anthropic/hh-rlhf", "helpful-base", "train"), ("Anthropic/hh-rlhf", "helpful-base", "test")]
    assert len(s.train) == 2 and len(s.test) == 1 and s.skipped == {"train": 0, "test": 1}
    assert s.train[0].source == "hf:Anthropic/hh-rlhf/helpful-base/train:1"
    assert s.test[0].prompt == "\n\nHuman: t?\n\nAssistant:"


# ----------------------------------------------------------------------------- PKU-SafeRLHF

def pku(prompt, r0, r1, safe0, safe1, better, safer, **extra):
    row = {"prompt": prompt, "response_0": r0, "response_1": r1,
           "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
           "is_response_0_safe": safe0, "is_response_1_safe": safe1,
           "response_0_harm_category": {"Violence": not safe0}, "response_1_harm_category": {"Violence": not safe1},
           "response_0_severity_level": 0 if safe0 else 2, "response_1_severity_level": 0 if safe1 else 2,
           "better_response_id": better, "safer_response_id": safer}
    row.update(extra)
    return row


PKU_ROWS = [
    pku("How do I pick a lock?", "Use a tension wrench and a pick.", "I can't help with that.\n", False, True, 0, 1),
    pku("  What is the capital of France? ", "Paris.", "It is Paris, a city on the Seine.", True, True, 1, 0),
    pku("Write an insult.", "You idiot.", "Here is one: you fool.", False, False, 0, 1),
]


def test_pku_safer_and_better(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PKU_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl.gz", [pku("Is it safe?", "Yes.", "No.", True, False, 1, 0)])
    safer = pku_safety.load(path=str(train), test_path=str(test))
    better = pku_safety.load(path=str(train), test_path=str(test), preference="better")
    assert safer.name == "pku_safety"
    e = safer.train[0]
    assert e.prompt == "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert e.responses == (" Use a tension wrench and a pick.", " I can't help with that.")
    assert e.harmful == (True, False)
    assert (e.chosen, e.rejected) == (1, 0) and e.best == 1 and e.scores is None
    assert safer.train[1].prompt == "\n\nHuman: What is the capital of France?\n\nAssistant:"
    assert [(x.chosen, x.rejected) for x in safer.train] == [(1, 0), (0, 1), (1, 0)]
    assert [(x.chosen, x.rejected) for x in better.train] == [(0, 1), (1, 0), (0, 1)]
    assert [x.harmful for x in better.train] == [(True, False), (False, False), (True, True)]
    assert safer.test[0].harmful == (False, True) and safer.test[0].chosen == 0
    assert better.test[0].chosen == 1
    # same chat format as HH: an HH transcript built from it splits back into the same pieces
    assert hh_rlhf.parse_row({"chosen": e.prompt + e.responses[1], "rejected": e.prompt + e.responses[0]},
                             "x:1").prompt == e.prompt


def test_pku_bad_preference_lists_options(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", PKU_ROWS)
    with pytest.raises(DataError, match=r"dataset\.preference\b.*'safer', 'better'.*'helpful'"):
        pku_safety.load(path=str(path), preference="helpful")


@pytest.mark.parametrize("bad,message", [
    (pku("q", "a", "b", "yes", True, 0, 1), r"'is_response_0_safe'.*'yes'"),
    (pku("q", "a", "b", True, True, 0, 2), r"'safer_response_id'.*\b2\b"),
    (pku("q", "a", "b", True, True, 0, None), r"'safer_response_id'.*\bnull\b"),
    (pku("q", "   ", "b", True, True, 0, 1), r"'response_0'.*\bempty\b"),
    ({k: v for k, v in pku("q", "a", "b", True, True, 0, 1).items() if k != "response_1"},
     r"missing\b.*'response_1'"),
])
def test_pku_bad_rows(tmp_path, caplog, bad, message):
    path = write_jsonl(tmp_path / "x.jsonl", PKU_ROWS[:2] + [bad] + PKU_ROWS[2:])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3\b.*{message}"):
        pku_safety.load(path=str(path), test_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="hps_exp.data"):
        s = pku_safety.load(path=str(path), test_fraction=0.0, on_bad_row="skip")
    assert len(s.train) == 3 and s.skipped["train"] == 1
    assert re.search(rf"\b1 bad\b.*\b4\b.*{re.escape(str(path))}", caplog.text), caplog.text


# ----------------------------------------------------------------------------- ranked JSONL

AUTHORS_ROWS = [
    {"prompt": "\n\nHuman: p0\n\nAssistant:", "responses": [" a", " b", " c", " d"], "rewards": [0.5, 2.0, -1.0, 2.0]},
    {"prompt": "\n\nHuman: p1\n\nAssistant:", "responses": [" x", " y"], "rewards": [-3, 1]},
    {"prompt": "\n\nHuman: p2\n\nAssistant:", "responses": [" u", " v", " w"], "rewards": [1.0, 0.0, 0.0]},
]


def test_ranked_authors_format(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl.gz", AUTHORS_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q", "responses": ["1", "2"], "rewards": [0, 1]}])
    s = ranked_jsonl.load(path=str(train), test_path=str(test))
    e = s.train[0]
    assert e.scores == (0.5, 2.0, -1.0, 2.0) and e.responses == (" a", " b", " c", " d")
    assert (e.chosen, e.rejected) == (1, 2) and e.best == 1  # first of the tied maxima; the minimum
    assert (s.train[1].chosen, s.train[1].rejected, s.train[1].scores) == (1, 0, (-3.0, 1.0))
    # tied minima: rejected is the LAST of them (Example.worst, as sampler=best_worst picks it)
    assert (s.train[2].chosen, s.train[2].rejected) == (0, 2)
    assert s.test[0].chosen == 1 and s.test[0].harmful is None


def test_ranked_our_schema_roundtrip(tmp_path):
    examples = [
        Example("\n\nHuman: p\n\nAssistant:", (" a", " b", " c"), scores=(0.1, 0.9, 0.3), harmful=(False, True, False),
                chosen=1, rejected=0),
        Example("\n\nHuman: q\n\nAssistant:", (" x", " y"), chosen=1, rejected=0),  # no scores, pair only
        Example("\n\nHuman: r\n\nAssistant:", (" m", " n", " o"), scores=(1.0, 1.0, -2.0), rejected=2),
    ]
    path = tmp_path / "aug.jsonl"
    write_examples(path, examples)
    s = ranked_jsonl.load(path=str(path), test_fraction=0.0)
    assert s.train == examples  # Example equality ignores `source`
    assert s.train[0].source == f"{path}:1" and s.train[0].harmful == (False, True, False)
    # a file mixing both formats loads too, and a path-only file splits by prompt
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [e.to_json() for e in examples] + AUTHORS_ROWS)
    a = ranked_jsonl.load(path=str(mixed), test_fraction=0.35, seed=3)
    b = ranked_jsonl.load(path=str(mixed), test_fraction=0.35, seed=3)
    assert len(a.test) == 2 and len(a.train) == 4
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.test}
    assert sources(a.test) == sources(b.test)


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "rewards": [1.0, 2.0]}, r"\b2 rewards\b.*\b3 responses\b"),
    ({"prompt": "p", "responses": ["a", "b"], "rewards": [1.0, 1.0]}, r"\brewards\b.*\bequal\b"),
    ({"prompt": "p", "responses": ["a", "b"], "rewards": [1.0, "2"]},
     r"'rewards' item 1\b.*\bstr\b"),
    ({"prompt": "p", "responses": ["a", "b"], "rewards": [1.0, float("nan")]}, r"'rewards' item 1\b.*\bfinite\b"),
    ({"prompt": "p", "responses": ["a", 7], "rewards": [1.0, 2.0]},
     r"'responses' item 1\b.*\bint\b"),
    ({"prompt": "p", "responses": ["a", ""], "rewards": [1.0, 2.0]}, r"'responses' item 1\b.*\bempty\b"),
    ({"prompt": "p", "responses": ["a"], "rewards": [1.0]}, r"'responses'.*\b2\b.*\b1\b"),
    ({"prompt": "", "responses": ["a", "b"], "rewards": [1.0, 2.0]}, r"'prompt'.*\bempty\b"),
    ({"responses": ["a", "b"], "rewards": [1.0, 2.0]}, r"missing\b.*'prompt'"),
    ({"prompt": "p", "responses": ["a", "b"]}, r"missing\b.*'rewards'.*'scores'"),
    ({"prompt": "p", "responses": ["a", "b"], "rewards": [1, 2], "scores": [1, 2]}, r"\bboth\b.*'rewards'.*'scores'"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3], "chosen": 0, "rejected": 1},
     r"\b3 scores\b.*\b2 responses\b"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": None, "chosen": 0, "rejected": 5},
     r"chosen=0, rejected=5\b.*\b2 responses\b"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": None, "harmful": [True]}, r"\b1 harmful\b.*\b2 responses\b"),
])
def test_ranked_bad_rows(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "r.jsonl", AUTHORS_ROWS[:1] + [bad] + AUTHORS_ROWS[1:])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2\b.*{message}"):
        ranked_jsonl.load(path=str(path))
    s = ranked_jsonl.load(path=str(path), test_fraction=0.0, on_bad_row="skip")
    assert len(s.train) == 3 and s.skipped == {"train": 1, "test": 0}
