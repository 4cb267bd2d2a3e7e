"""hps_exp.eval_metrics against hand computations (and NLTK, only where it happens to be installed)."""
import math

import pytest

from hps_exp import eval_metrics as em

# (hypothesis, reference, BLEU x 100 computed by hand: p_n = clipped char n-gram matches / hyp n-grams)
CHAR_CASES = [
    ("abcde", "abcde", 100.0),
    # p = 4/5, 3/4, 2/3, 1/2; equal lengths: BP = 1
    ("abcdx", "abcdy", 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25),
    # all p = 1, hyp shorter: BP = exp(1 - 6/4)
    ("abcd", "abcdef", 100 * math.exp(1 - 6 / 4)),
    # clipping: hyp has 6 a's, ref 4 -> p = 4/6, 3/5, 2/4, 1/3; hyp longer: BP = 1
    ("aaaaaa", "aaaab", 100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25),
    # spaces are characters: "abcd" has no 4-gram in "ab cd" -> no smoothing -> 0
    ("abcd", "ab cd", 0.0),
    ("abc", "abc", 0.0),  # shorter than 4 characters: no 4-gram can match
    ("", "abc", 0.0),
    ("xyz!", "abcd", 0.0),
]


@pytest.mark.parametrize("hyp, ref, expected", CHAR_CASES)
def test_char_bleu_hand_cases(hyp, ref, expected):
    assert em.char_bleu(hyp, ref) == pytest.approx(expected, abs=1e-9)


def test_char_bleu_is_not_word_bleu():
    # Word order inside a word matters at character level; word BLEU would see two unrelated tokens.
    assert em.char_bleu("the cats", "the cat") > 50.0
    assert em.sentence_sacrebleu("the cats", "the cat") < em.char_bleu("the cats", "the cat")


@pytest.mark.parametrize("hyp, ref, _", CHAR_CASES + [("the quick brown fox", "a quick brown dog", None)])
def test_char_bleu_matches_nltk_when_available(hyp, ref, _):
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on zero counts
        expected = 100 * bleu_score.sentence_bleu([ref], hyp)
    assert em.char_bleu(hyp, ref) == pytest.approx(expected, abs=1e-6)


def test_sentence_sacrebleu_hand_cases():
    assert em.sentence_sacrebleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # words: p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths -> BP = 1
    assert em.sentence_sacrebleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(
        100 * (1 / 12) ** 0.25)
    # p1 = 3/4, p2 = 1/3, p3 and p4 have no match: exp smoothing gives 1/(2*2) and 1/(4*1)
    assert em.sentence_sacrebleu("the cat sat here", "the cat ran here") == pytest.approx(
        100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    assert em.sentence_sacrebleu("xyz", "abc") == 0.0


def test_sacrebleu_signature():
    sig = em.sacrebleu_signature()
    for part in ("nrefs:1", "eff:yes", "tok:13a", "smooth:exp", "version:"):
        assert part in sig


def test_paper_protocol_hand_computed():
    gens = [["abcdx", "zzzz", "abcdef"], ["hello world", "hello there", "bye"]]
    g_rew = [[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]]        # prompt 1: a tie -> the first (hello world)
    refs = [["abcdef", "abcd"], ["hello there", "nope"]]
    r_rew = [[2.0, 1.0], [0.0, 4.0]]                     # best refs: "abcdef", "nope"
    scalars, per = em.paper_protocol(gens, g_rew, refs, r_rew)
    assert scalars["reward"] == pytest.approx((1 - 2 + 3 + 0.5 + 0.5 - 1) / 6)
    assert per["reward"] == pytest.approx([2 / 3, 0.0])
    assert per["reward_top1"] == [3.0, 0.5]
    assert scalars["reward_top1"] == pytest.approx(1.75)
    # prompt 0: best generation "abcdef" == best reference -> 100; prompt 1: "hello world" vs "nope":
    # characters o, e match (p1 > 0) but no 2-gram does -> 0
    assert per["bleu_char"] == pytest.approx([100.0, 0.0])
    assert scalars["bleu_char"] == pytest.approx(50.0)
    assert per["bleu_sentence"] == pytest.approx([100.0, 0.0])
    assert scalars["bleu_sentence"] == pytest.approx(50.0)
    assert "tok:13a" in scalars["bleu_signature"]


def test_paper_protocol_uses_argmax_of_reward_not_first():
    scalars, per = em.paper_protocol([["wrong text", "abcdx"]], [[0.0, 1.0]], [["no", "abcdy"]], [[5.0, 1.0]])
    # best generation "abcdx" vs best reference "no": no shared character -> 0
    assert per["bleu_char"] == [0.0]
    scalars, per = em.paper_protocol([["wrong text", "abcdx"]], [[0.0, 1.0]], [["no", "abcdy"]], [[1.0, 5.0]])
    assert per["bleu_char"] == pytest.approx([100 * 0.2 ** 0.25])


@pytest.mark.parametrize("args, message", [
    (([["a"]], [[1.0]], [["a"]], [[1.0]] * 2), "references"),
    (([["a", "b"]], [[1.0]], [["a"]], [[1.0]]), r"generations\[0\]"),
    (([["a"]], [[float("nan")]], [["a"]], [[1.0]]), r"generations\[0\]\[0\]"),
    (([], [], [], []), "^paper_protocol:"),
])
def test_paper_protocol_rejects_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        em.paper_protocol(*args)


def test_win_rate():
    rate, per = em.win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0])
    assert per == [1.0, 0.5, 0.0, 1.0]
    assert rate == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match=r"\b3 aligned\b.*\b2 SFT"):
        em.win_rate([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="prompt 1"):
        em.win_rate([1.0, float("nan")], [1.0, 2.0])
