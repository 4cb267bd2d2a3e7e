"""Reward models for annotation (scoring the n sampled responses) and evaluation.

Two kinds, both with `score_batch(prompts, responses) -> list[float]` (higher = better), the protocol that
`hps_exp.evaluate` and `hps_exp.augment` use:

- `HFRewardModel(name_or_path)`: any Hugging Face sequence-classification reward model (one output logit),
  from the hub or a local directory saved with `save_pretrained`. The text scored is `prompt + response`
  (input_format="concat", right-padded, truncated from the LEFT so the response survives), or the tokenizer's
  text pair `(prompt, response)` (input_format="pair", for cross-encoder RMs such as OpenAssistant's DeBERTa).
  Pooling is the model's own (e.g. GPT-2's "last non-pad token"; BERT-likes' [CLS]).
- `train_reward_model(train, tok=...)`: a Bradley-Terry reward model trained here with the loss
  -log sigmoid(s(chosen) - s(rejected)) through the shared `Trainer`, with a linear head on the hidden state of
  the LAST REAL TOKEN, found from the sequence lengths (never from the pad value: pad == eos here). Two nets:
  - `backbone=None` (default): a tiny GPT-2 built from scratch with the SFT tokenizer. It scores the token
    sequence prompt (last `max_prompt_length` tokens) + response + eos (cut at `max_length`, exactly as
    `hps_exp.batching.encode_examples` builds policy inputs): encoding "split".
  - `backbone=<hub id | dir | pkg:...gguf>`: that pretrained LM (`models.load_pretrained`) with a scalar head, its
    own tokenizer, optional LoRA (`lora`, the settings of model.lora). It scores prompt + response tokenized as
    one text and cut from the left to `max_length`, exactly HFRewardModel's "concat" input: encoding "concat".
    Saved, it is a plain HF sequence-classification directory that `HFRewardModel` loads and scores alike.
  `subset=half_a|half_b` trains on one half of the prompts (`prompt_half`): two reward models on disjoint pairs.
  `pair_accuracy(rm, examples)` is the held-out fraction of (chosen, rejected) pairs it orders correctly.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hps_exp.batching import SequenceBatch, collate
from hps_exp.config import OptimConfig, RuntimeConfig
from hps_exp.data.schema import Example
from hps_exp.io import atomic_write_text
from hps_exp.models import ModelError, apply_lora, is_lora, load_pretrained, lora_settings
from hps_exp.trainer import Trainer

RM_CONFIG = "hps_reward_model.json"
SUBSETS = ("all", "half_a", "half_b")
# The from-scratch net's settings: a pretrained backbone has its own sizes and dropout.
TINY_KNOBS = ("n_layer", "n_head", "n_embd", "n_positions", "dropout")


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score_batch: {len(prompts)} prompts but {len(responses)} responses")


# ---------------------------------------------------------------- Hugging Face reward models

class HFRewardModel:
    """A pretrained sequence-classification reward model (num_labels = 1), e.g.
    `OpenAssistant/reward-model-deberta-v3-large-v2` (input_format="pair") or a GPT-2 / Llama RM ("concat").

    Loading happens here (so a bad name fails before any training). A checkpoint whose classification head
    is not in the weights (a plain LM or encoder) would score with a random head: that raises ModelError too.
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_length: int = 512, input_format: str = "concat", dtype: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if input_format not in ("concat", "pair"):
            raise ValueError(f"reward_model.input_format must be 'concat' or 'pair', got {input_format!r}")
        if isinstance(device, str) and device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name_or_path, self.device = str(name_or_path), torch.device(device)
        self.batch_size, self.max_length, self.input_format = int(batch_size), int(max_length), input_format
        torch_dtype = getattr(torch, dtype) if dtype else None
        try:
            self.tok = AutoTokenizer.from_pretrained(self.name_or_path)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.name_or_path, num_labels=1, output_loading_info=True,
                **({"dtype": torch_dtype} if torch_dtype is not None else {}))
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"could not load reward model '{self.name_or_path}' ({first}). Offline or no such model? Point at "
                f"a local copy saved with save_pretrained: reward_model.name_or_path=/path/to/reward_model_dir, "
                f"or train a small one on the data: reward_model=train") from None
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
        head_missing = [k for k in missing if any(h in k for h in ("score", "classifier", "pooler", "out_proj"))]
        if head_missing:
            raise ModelError(
                f"'{self.name_or_path}' is not a reward model: its classification head ({', '.join(head_missing[:3])}) "
                f"is not in the checkpoint, so scores would come from random weights. Use a sequence-classification "
                f"reward model (reward_model.name_or_path=...), or reward_model=train")
        if self.tok.pad_token is None:
            if self.tok.eos_token is None:
                raise ModelError(f"reward model '{self.name_or_path}': tokenizer has neither a pad nor an eos token")
            self.tok.pad_token = self.tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tok.pad_token_id  # last-non-pad pooling needs it for batches > 1
        # Right padding: GPT-2-style models build positions from 0 whatever the padding, so left padding
        # would shift them; their pooling takes the rightmost non-pad token, which right padding keeps.
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"  # keep the end of the text: the response
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        out = [0.0] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.input_format == "pair":
                enc = self.tok([prompts[i] for i in idx], [responses[i] for i in idx], padding=True,
                               truncation="only_first", max_length=self.max_length, return_tensors="pt")
            else:
                enc = self.tok([prompts[i] + responses[i] for i in idx], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits.float()
            for i, v in zip(idx, logits[:, 0].cpu().tolist()):
                out[i] = float(v)
        return out

    def __repr__(self) -> str:
        return f"HFRewardModel({self.name_or_path!r}, device={str(self.device)!r})"


# ---------------------------------------------------------------- Bradley-Terry reward model trained here

def encode_pairs(tok, prompts: Sequence[str], responses: Sequence[str], max_prompt_length: int,
                 max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) per text pair, cut exactly like batching.encode_examples."""
    p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    r_ids = tok(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    out = []
    for p, r in zip(p_ids, r_ids):
        p = p[-max_prompt_length:]
        out.append((p, (r + [tok.eos_token_id])[:max(1, max_length - len(p))]))
    return out


def encode_concat(tok, prompts: Sequence[str], responses: Sequence[str],
                  max_length: int) -> list[tuple[list[int], list[int]]]:
    """prompt + response tokenized as one text (the tokenizer's own special tokens) and cut from the LEFT to
    `max_length` tokens: HFRewardModel's "concat" input, as (ids, []) pairs for `collate`."""
    if not prompts:
        return []
    tok.truncation_side = "left"   # keep the end of the text: the response
    ids = tok([p + r for p, r in zip(prompts, responses)], truncation=True, max_length=max_length)["input_ids"]
    return [(list(x), []) for x in ids]


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[S] reward of right-padded sequences: linear head on the hidden state of each one's last real token.
    `model` is a transformers sequence classifier (its backbone under `base_model_prefix`, its head `score`),
    maybe inside peft's LoRA wrapper (adapters in the backbone, the head peft's trained copy)."""
    net = model.get_base_model() if is_lora(model) else model
    backbone = getattr(net, net.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.long().sum(-1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return net.score(pooled).squeeze(-1).float()


def prompt_half(examples: Sequence[Example], subset: str, seed: int) -> list[Example]:
    """The examples of one half of the distinct prompts (`subset` half_a | half_b), or all of them. The halves
    come from a permutation seeded by `seed`, so two reward models trained on half_a and half_b never see
    a pair of the same prompt."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}; got {subset!r}")
    if subset == "all":
        return list(examples)
    prompts = sorted({e.prompt for e in examples})
    order = np.random.default_rng([seed, 4]).permutation(len(prompts))
    first = {prompts[i] for i in order[:(len(prompts) + 1) // 2]}
    return [e for e in examples if (e.prompt in first) == (subset == "half_a")]


def preference_pairs(ex: Example, pairs: str) -> list[tuple[int, int]]:
    """(preferred, dispreferred) index pairs of one example for BT training / accuracy.

    chosen_rejected: the dataset's pair; best_vs_rest: best vs every response scored strictly lower;
    all: every strictly ordered pair by score; auto: all when the example has scores, else chosen_rejected.
    """
    if pairs == "auto":
        pairs = "all" if ex.scores is not None else "chosen_rejected"
    if pairs == "chosen_rejected" or ex.scores is None:
        return [(ex.chosen, ex.rejected)]
    s = ex.scores
    if pairs == "best_vs_rest":
        return [(ex.best, j) for j in sorted(ex.negatives)]
    if pairs == "all":
        return [(i, j) for i in range(ex.n) for j in range(ex.n) if s[i] > s[j]]
    raise ValueError(f"pairs must be auto, chosen_rejected, best_vs_rest or all; got {pairs!r}")


ENCODINGS = {"split": "prompt (last max_prompt_length tokens) + response + eos, cut at max_length",
             "concat": "prompt + response as one text, cut from the left to max_length (HFRewardModel's concat)"}


class TrainedRewardModel:
    """A reward model trained here: a transformers sequence classifier scored on the last real token of its
    `encoding` of (prompt, response) (ENCODINGS: "split" for the tiny net, "concat" for a pretrained backbone)."""

    def __init__(self, model, tok, *, max_prompt_length: int, max_length: int, device="cpu",
                 autocast: torch.dtype | None = None, batch_size: int = 64, encoding: str = "split"):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
        self.model, self.tok, self.encoding = model, tok, encoding
        self.max_prompt_length, self.max_length = int(max_prompt_length), int(max_length)
        self.device = torch.device(device)
        self.autocast, self.batch_size = autocast, int(batch_size)
        self.train_result: dict | None = None
        self.model.to(self.device)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """What the model reads of each (prompt, response), in training and in scoring alike."""
        if self.encoding == "concat":
            return encode_concat(self.tok, prompts, responses, self.max_length)
        return encode_pairs(self.tok, prompts, responses, self.max_prompt_length, self.max_length)

    @torch.no_grad()
    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        self.model.eval()
        pairs = self.encode(prompts, responses)
        out = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            b = collate([pairs[i] for i in idx], self.tok.pad_token_id).to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                s = sequence_scores(self.model, b.input_ids, b.attention_mask)
            for i, v in zip(idx, s.float().cpu().tolist()):
                out[i] = float(v)
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """A plain HF sequence-classification directory, its tokenizer and RM_CONFIG."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        self.tok.save_pretrained(d)
        atomic_write_text(d / RM_CONFIG, json.dumps({
            "kind": "bt_reward_model", "max_prompt_length": self.max_prompt_length, "max_length": self.max_length,
            "encoding": self.encoding, "pooling": f"last real token (position-based), input = "
                                                  f"{ENCODINGS[self.encoding]}"}, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, device="cpu", autocast: torch.dtype | None = None,
             batch_size: int = 64) -> "TrainedRewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        d = Path(directory)
        meta_path = d / RM_CONFIG
        if not meta_path.exists():
            raise ModelError(f"{d}: no {RM_CONFIG}; not a reward model saved by TrainedRewardModel.save")
        meta = json.loads(meta_path.read_text())
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForSequenceClassification.from_pretrained(d)
        return cls(model, tok, max_prompt_length=meta["max_prompt_length"], max_length=meta["max_length"],
                   device=device, autocast=autocast, batch_size=batch_size, encoding=meta.get("encoding", "split"))

    def __repr__(self) -> str:
        return f"TrainedRewardModel(params={sum(p.numel() for p in self.model.parameters())}, device={self.device})"


def build_reward_net(vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, n_positions: int,
                     eos_token_id: int, seed: int, dropout: float = 0.1):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, num_labels=1, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                        pad_token_id=eos_token_id, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2ForSequenceClassification(config)


def backbone_reward_net(backbone: str, seed: int):
    """(tokenizer, sequence classifier): the pretrained LM `backbone` (`models.load_pretrained`: hub id, local dir,
    pkg:...gguf) with a scalar head (seeded init) in place of its LM head. config.pad_token_id is set, so a saved
    model's own pooling (transformers': the rightmost non-pad token) finds the last real token of a "concat"
    input, which ends with the response, never with a pad."""
    from transformers import AutoModelForSequenceClassification

    tok, lm = load_pretrained(backbone)
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_config(config)
    setattr(net, net.base_model_prefix, getattr(lm, lm.base_model_prefix))   # the pretrained body, not a copy
    return tok, net


def train_reward_model(train: list[Example], *, optim: OptimConfig, runtime: RuntimeConfig | None = None,
                       tok=None, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, n_positions: int = 256,
                       max_prompt_length: int, max_length: int, epochs: int, batch_size: int, seed: int,
                       device="cpu", autocast: torch.dtype | None = None, logger=None, pairs: str = "auto",
                       dropout: float = 0.1, checkpoint: Path | None = None, stage: str = "reward_model",
                       backbone: str | None = None, lora: dict | None = None,
                       subset: str = "all") -> TrainedRewardModel:
    """Train a Bradley-Terry reward model on the preference pairs of `train` (of its `subset` of prompts).

    The net is a tiny GPT-2 built here with `tok` (`n_layer`, `n_head`, `n_embd`, `n_positions`, `dropout`) or,
    with `backbone`, that pretrained LM and its own tokenizer; `lora` (model.lora's settings) trains adapters
    and the head only, merged into the returned model. `autocast` is the run's precision (bf16 or None).
    batch_size = preference pairs per micro-batch (2 x batch_size sequences). `pairs` picks which pairs of
    each example are used (see `preference_pairs`; default: all strictly ordered pairs when scores exist,
    else the dataset's (chosen, rejected)). Pairs are reshuffled each epoch from `seed`; init is seeded too,
    so the same inputs give the same model. Logs `<stage>/loss`, `<stage>/accuracy`, `<stage>/margin`.

    `optim`: every key is honoured (lr: reward_model.lr; grad_accum, warmup_ratio, schedule, weight_decay,
    max_grad_norm, on_nonfinite: trainer.*'s in a run). `runtime` (default: RuntimeConfig()): log_every, save_every
    and resume (from `checkpoint`) are honoured; the net is trained by one process, so strategy must be none.
    """
    train = prompt_half(train, subset, seed)
    device = torch.device(device)
    if backbone:
        tok, model = backbone_reward_net(backbone, seed)
    elif tok is None:
        raise ValueError("train_reward_model: a tokenizer (tok) is needed to build the tiny net without a backbone")
    elif max_length > n_positions:
        raise ValueError(f"reward model: max_length={max_length} exceeds n_positions={n_positions}")
    else:
        model = build_reward_net(len(tok), n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                 eos_token_id=tok.eos_token_id, seed=seed, dropout=dropout)
    if lora_settings(lora, key="reward_model.lora")["enabled"]:
        model = apply_lora(model, lora, task_type="SEQ_CLS", key="reward_model.lora")
    rm = TrainedRewardModel(model, tok, max_prompt_length=max_prompt_length, max_length=max_length, device=device,
                            autocast=autocast, batch_size=max(64, 2 * batch_size),
                            encoding="concat" if backbone else "split")
    texts_p: list[str] = []
    texts_r: list[str] = []
    index: list[tuple[int, int]] = []  # (preferred row, dispreferred row) into the encoded list
    for ex in train:
        prs = preference_pairs(ex, pairs)
        if not prs:
            continue
        base = len(texts_r)
        texts_p += [ex.prompt] * ex.n
        texts_r += list(ex.responses)
        index += [(base + i, base + j) for i, j in prs]
    if not index:
        raise ValueError("train_reward_model: no preference pairs in the training data")
    encoded = rm.encode(texts_p, texts_r)
    pad = tok.pad_token_id

    def make_epoch(epoch: int, progress):
        order = np.random.default_rng([seed, 3, epoch]).permutation(len(index))
        for start in range(0, len(order), batch_size):
            chunk = [index[k] for k in order[start:start + batch_size]]
            seqs = [encoded[w] for w, _ in chunk] + [encoded[loser] for _, loser in chunk]
            yield collate(seqs, pad)  # 2B rows: B preferred, then their B dispreferred

    def step(model, batch: SequenceBatch):
        b = batch.to(device)
        s = sequence_scores(model, b.input_ids, b.attention_mask)
        half = s.shape[0] // 2
        margin = s[:half] - s[half:]
        loss = -F.logsigmoid(margin).mean()
        m = margin.detach()
        return loss, {"accuracy": float((m > 0).float().mean()), "margin": float(m.mean())}

    trainer = Trainer(model, optim, runtime or RuntimeConfig(), epochs, device=device, autocast=autocast,
                      logger=logger, stage=stage, checkpoint=checkpoint)
    result = trainer.fit(make_epoch, math.ceil(len(index) / batch_size), step)
    if logger is not None and hasattr(logger, "next_stage"):
        logger.next_stage()
    if is_lora(model):   # a plain classifier from here on: scores, saves and loads like any other
        rm.model = model.merge_and_unload()
    rm.train_result = {**result, "pairs": len(index)}
    return rm


def pair_accuracy(rm, examples: list[Example], pairs: str = "chosen_rejected") -> float:
    """Fraction of preference pairs with s(preferred) > s(dispreferred) (ties count as wrong).

    Default: each example's dataset pair (chosen, rejected). Works with any object with `score_batch`.
    """
    prompts: list[str] = []
    responses: list[str] = []
    idx: list[tuple[int, int]] = []
    for ex in examples:
        base = len(responses)
        prompts += [ex.prompt] * ex.n
        responses += list(ex.responses)
        idx += [(base + i, base + j) for i, j in preference_pairs(ex, pairs)]
    if not idx:
        raise ValueError("pair_accuracy: no preference pairs")
    s = rm.score_batch(prompts, responses)
    return sum(s[i] > s[j] for i, j in idx) / len(idx)
