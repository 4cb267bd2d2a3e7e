"""The embedded default dataset (`dataset=synthetic`): generated, seeded, deterministic, no network.

A small safety-flavoured preference set that a ~1M-parameter causal LM can learn on a CPU in minutes.
There are two kinds of prompt, both in the HH-RLHF format "\\n\\nHuman: <request>\\n\\nAssistant:":

- benign requests from 14 topics (bread, pasta, tea, tomatoes, trip, study, sleep, running, money,
  bike, puppy, language, laundry, swim). Each topic has ONE correct helpful answer built from a
  sentence template with 3 key facts; each fact has 1-2 wrong alternatives;
- harmful requests from 8 topics (burglary, weapon, password, car theft, assault, shoplifting,
  cheating, spying). The best answer is a refusal plus a topic-specific safe redirect; complying
  means giving the topic's 3 harmful steps.

Each topic is asked with 3 subject phrasings. Train prompts use 8 question templates, test prompts
4 *other* templates (same topics and subjects), each with an optional greeting prefix and
thanks suffix; so no prompt string is in both splits, yet everything a test prompt needs is taught
by the train split. Prompts are spread evenly over topics; a prompt string repeats within a split
only when the split asks for more prompts than its templates can phrase (thousands).

Candidate responses of a prompt (n_responses in total, shuffled; `chosen` = the best one,
`rejected` = a seeded-random response scored strictly below it):

- benign prompt: the helpful answer (best); HARD negatives: the helpful answer with one harmful
  sentence inserted, or with one or two facts swapped for wrong ones, or truncated, or its first
  words repeated three times; EASY negatives: needless refusals, another topic's answer
  (off-topic), rambling filler, harmful instructions for some other request;
- harmful prompt: refusal + redirect (best); HARD negatives: the best answer with one of the harmful
  steps inserted (a "leaky refusal"), refusal without the redirect; EASY ones: full or partial
  compliance (optionally with a disclaimer), redirect only, another harmful topic's refusal,
  a benign topic's answer, rambling filler.

Every prompt with n_responses >= 6 has one negative of each of {best + harmful sentence,
one swapped fact (benign) / bare refusal (harmful), needless refusal (benign) / full compliance
(harmful), off-topic}, the rest drawn at random (uniform over categories); with fewer responses the
negatives are a seeded-random subset of those four. Ties: in about 10% of prompts (when
n_responses >= 3) one negative slot holds a paraphrase of the best answer with exactly the same score
("sure, " + the benign answer, or another refusal wording + the redirect), so the best is tied there;
elsewhere the best is unique.

Modules: content (the literal texts: topics, facts, phrasings, templates), index (the phrase index, vocabulary and
prompt -> topic), scorer (the exact reward rule: `SyntheticScorer`, rule table in its docstring), generator
(candidate pools and the seeded splits: `load`).
"""
from hps_exp.data.synthetic.content import (
    BENIGN,
    FILLERS,
    HARMFUL,
    REFUSALS,
    TOPIC_BY_KEY,
    TOPICS,
    TWISTS,
    Topic,
    best_response,
    format_prompt,
    helpful_answer,
    words,
)
from hps_exp.data.synthetic.generator import MAX_RESPONSES, load
from hps_exp.data.synthetic.index import VOCAB, topic_of
from hps_exp.data.synthetic.scorer import SyntheticScorer

__all__ = ["BENIGN", "FILLERS", "HARMFUL", "MAX_RESPONSES", "REFUSALS", "TOPICS", "TOPIC_BY_KEY", "TWISTS", "VOCAB",
           "SyntheticScorer", "Topic", "best_response", "format_prompt", "helpful_answer", "load", "topic_of", "words"]
