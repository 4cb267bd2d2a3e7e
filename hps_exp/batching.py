"""Tokenised examples, padded batches and per-sequence log-probabilities.

Response masks come from positions (prompt length, sequence length), never from the pad token's
value: with pad == eos (GPT-2 and our tiny model) a value-based mask would drop the real eos.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hps_exp.data.schema import Example


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    responses: list[list[int]]   # each ends with eos (unless truncated)


def encode_examples(tok, examples: list[Example], max_prompt_length: int, max_length: int) -> list[Encoded]:
    """Prompt keeps its last tokens (the question is at the end); responses are cut at max_length."""
    prompts = tok([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    flat = [r for e in examples for r in e.responses]
    resp_ids = tok(flat, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for e, p in zip(examples, prompts):
        p = p[-max_prompt_length:]
        budget = max_length - len(p)
        rs = [(ids + [tok.eos_token_id])[:budget] for ids in resp_ids[k:k + e.n]]
        k += e.n
        out.append(Encoded(p, rs))
    return out


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor       # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    response_mask: torch.Tensor   # [S, T], True on response tokens (the labels scored)

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device, non_blocking=True) for t in
                               (self.input_ids, self.attention_mask, self.response_mask)))


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Right-pad prompt+response sequences; masks built from lengths only."""
    lengths = [len(p) + len(r) for p, r in pairs]
    T = max(lengths)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.bool)
    resp = torch.zeros((len(pairs), T), dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = True
        resp[i, len(p):len(p) + len(r)] = True
    return SequenceBatch(ids, attn, resp)


# ---------------------------------------------------------------- scored-positions-only log-probs
#
# The LM head and the log-softmax over the vocabulary are the widest tensors of a forward; a
# preference or SFT step only needs them where a label is scored (response tokens, ~half the
# positions). So run the decoder body, pick the scored hidden states, and apply the head to those.
# That is only exact when the model's logits are head(last hidden state) with nothing after it;
# models that scale or soft-cap logits (Cohere's logit_scale, Gemma 2's final_logit_softcapping,
# Granite's logits_scaling, ...) or anything we cannot split fall back to the full forward.

# config attributes that change logits after the head; a non-trivial value means "do not split"
_LOGIT_TRANSFORMS = {"logit_scale": (None, 1, 1.0), "final_logit_softcapping": (None, 0, 0.0),
                     "logits_scaling": (None, 1, 1.0), "output_multiplier_scale": (None, 1, 1.0),
                     "mup_width_scale": (None, 1, 1.0), "logit_softcapping": (None, 0, 0.0)}
_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def head_split(model):
    """(decoder, head) with logits == head(decoder(...).last_hidden_state), checked once per model; None if not."""
    try:
        return _SPLITS[model]
    except (KeyError, TypeError):
        pass
    split = _find_split(model)
    try:
        _SPLITS[model] = split
    except TypeError:
        pass
    return split


def _find_split(model):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_output_embeddings"):
        return None
    config = model.config
    if any(getattr(config, k, None) not in ok for k, ok in _LOGIT_TRANSFORMS.items()):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
        return None
    # A numerical check on a short input catches any other post-head transform (model code we have
    # not read). Eval mode so that dropout does not make the two forwards differ.
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.arange(1, 7, device=device).remainder(max(2, head.out_features)).unsqueeze(0)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            split = head(hidden).float()
        same = full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
    except Exception:  # noqa: BLE001 - any failure means "use the full forward", never a crash
        same = False
    finally:
        model.train(was_training)
    return (decoder, head) if same else None


def scored_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each scored token [K], its row [K]) where scored[s, t] marks input_ids[s, t] as a label.

    Token t is predicted from position t - 1, so position 0 is never scored.
    """
    labels_mask = scored[:, 1:]
    rows = labels_mask.nonzero(as_tuple=True)[0]
    labels = input_ids[:, 1:][labels_mask]
    split = head_split(model)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logits = logits[labels_mask]
    else:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][labels_mask])
    # cross_entropy avoids materialising a second [K, V] log-softmax tensor
    return -F.cross_entropy(logits.float(), labels, reduction="none"), rows


def sequence_logps(model, batch: SequenceBatch) -> torch.Tensor:
    """[S] sum over response tokens of log p(token | everything before it)."""
    token_logps, rows = scored_token_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    return torch.zeros(batch.input_ids.shape[0], device=token_logps.device).index_add(0, rows, token_logps)


def sequence_nll(model, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood per response token (the SFT loss)."""
    token_logps, _ = scored_token_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    return -token_logps.sum() / max(1, token_logps.numel())


@torch.no_grad()
def all_response_logps(model, encoded: list[Encoded], pad_id: int, batch_size: int, device,
                       autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """log p(response | prompt) for every response of every example: [n_i] per example (the reference cache)."""
    model.eval()
    pairs = [(e.prompt, r) for e in encoded for r in e.responses]
    # sort by length so padding waste is small; restore order afterwards
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    values = torch.empty(len(pairs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([pairs[i] for i in idx], pad_id).to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            values[idx] = sequence_logps(model, batch).float().cpu()
    out, k = [], 0
    for e in encoded:
        out.append(values[k:k + len(e.responses)].clone())
        k += len(e.responses)
    return out


# ---------------------------------------------------------------- length bucketing

def bucketed_batches(lengths: list[int], batch_size: int, rng, chunk_batches: int = 8) -> list[list[int]]:
    """Batches of indices with little padding, still random, and a pure function of (lengths, rng state).

    Shuffle, cut into chunks of `chunk_batches` batches, sort each chunk by length (so a batch holds
    similar lengths), cut it into batches, then shuffle all batches (so long and short batches
    alternate and the step order carries no length trend). Every index appears exactly once; the same
    seed gives the same batches, which is what resuming from a checkpoint relies on.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"bucketed_batches: batch_size={batch_size} and chunk_batches={chunk_batches} must be >= 1")
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        # stable sort: ties keep the shuffled order, so equal lengths are still mixed
        part = sorted(order[start:start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the padded [rows, max length] tokens of these batches that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / max(1, padded)
