"""Tokenised examples, padded batches and per-sequence log-probabilities.

Response masks come from positions (prompt length, sequence length), never from the pad token's
value: with pad == eos (GPT-2 and our tiny model) a value-based mask would drop the real eos.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hps_exp.data.schema import Example
from hps_exp.samplers import Selection


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


# ---------------------------------------------------------------- preference batches

@dataclass
class SharedPrompts:
    """A preference batch laid out so each prompt is forwarded once: prompts [B, Tp] and responses [S, Tr]."""
    prompt_ids: torch.Tensor      # [B, Tp] right-padded
    prompt_mask: torch.Tensor     # [B, Tp] bool, True on real prompt tokens
    prompt_lengths: torch.Tensor  # [B]
    response_ids: torch.Tensor    # [S, Tr] right-padded, rows in slot order (row-major over the real slots)
    response_mask: torch.Tensor   # [S, Tr] bool, True on real response tokens (all are scored)
    row_prompt: torch.Tensor      # [S] index of each response's prompt

    def to(self, device) -> "SharedPrompts":
        return SharedPrompts(*(t.to(device, non_blocking=True) for t in
                               (self.prompt_ids, self.prompt_mask, self.prompt_lengths, self.response_ids,
                                self.response_mask, self.row_prompt)))


@dataclass
class PreferenceBatch:
    sequences: SequenceBatch      # [S, T] prompt+response per real slot, row-major over `mask`
    mask: torch.Tensor            # [B, M] real slots
    ref_logps: torch.Tensor       # [B, M]
    scores: torch.Tensor          # [B, M] (NaN without scores)
    num_negatives: torch.Tensor   # [B]
    stats: dict[str, float]
    shared: SharedPrompts | None = None  # the same rows for the prompt-once path (None: plain path only)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def shared_prompts(prompts: list[list[int]], responses: list[list[int]], row_prompt: list[int],
                   pad_id: int) -> SharedPrompts | None:
    """None when a prompt or response is empty (the prompt-once path needs a token to predict from)."""
    if not prompts or any(len(p) == 0 for p in prompts) or any(len(r) == 0 for r in responses):
        return None
    p_ids, p_mask = _pad(prompts, pad_id)
    r_ids, r_mask = _pad(responses, pad_id)
    return SharedPrompts(p_ids, p_mask, torch.tensor([len(p) for p in prompts]), r_ids, r_mask,
                         torch.tensor(row_prompt, dtype=torch.long))


def preference_batch(examples: list[Example], encoded: list[Encoded], ref: list[torch.Tensor],
                     selections: list[Selection], stats: list[dict], pad_id: int) -> PreferenceBatch:
    B, M = len(selections), max(len(s.indices) for s in selections)
    mask = torch.zeros(B, M, dtype=torch.bool)
    ref_t = torch.zeros(B, M)
    scores = torch.full((B, M), float("nan"))
    pairs, row_prompt = [], []
    for b, (ex, enc, r, sel) in enumerate(zip(examples, encoded, ref, selections)):
        for m, i in enumerate(sel.indices):
            mask[b, m] = True
            ref_t[b, m] = r[i]
            if ex.scores is not None:
                scores[b, m] = ex.scores[i]
            pairs.append((enc.prompt, enc.responses[i]))  # row-major order == mask order
            row_prompt.append(b)
    keys = {k for s in stats for k in s}
    mean_stats = {k: float(np.mean([s[k] for s in stats if k in s])) for k in keys}
    shared = shared_prompts([enc.prompt for enc in encoded], [r for _, r in pairs], row_prompt, pad_id)
    return PreferenceBatch(collate(pairs, pad_id), mask, ref_t, scores,
                           torch.tensor([s.num_negatives for s in selections]), mean_stats, shared)


# Responses per prompt from which forwarding each prompt once beats the plain path; measured with
# benchmarks/prompt_sharing.py (docs/benchmarks.md): at 2 the second forward's overhead eats the saving.
SHARE_PROMPTS_FROM = 3


def preference_logps(model, batch: PreferenceBatch, share_prompts: bool | None = None) -> torch.Tensor:
    """[B, M] policy log-prob of every slot's response given its prompt, 0 on masked slots.

    share_prompts: None picks by the batch's width (SHARE_PROMPTS_FROM), True/False forces a path
    (tests, benchmarks); the prompt-once path silently falls back to the plain one where it cannot run.
    """
    device = batch.mask.device if _param_device(model) is None else _param_device(model)
    mask = batch.mask.to(device)
    use_shared = batch.shared is not None and (
        share_prompts if share_prompts is not None else mask.shape[1] >= SHARE_PROMPTS_FROM)
    flat = shared_prompt_logps(model, batch.shared.to(device)) if use_shared else None
    if flat is None:
        flat = sequence_logps(model, batch.sequences.to(device))
    return torch.zeros(mask.shape, device=device, dtype=flat.dtype).masked_scatter(mask, flat.float())


def _param_device(model):
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def shared_prompt_logps(model, sp: SharedPrompts) -> torch.Tensor | None:
    """[S] response log-probs with each prompt forwarded once; None when the model does not allow it.

    The prompts run once with a KV cache; the cache's rows are then gathered per response (an index
    select, so gradients from every response flow back into its prompt's keys and values) and the
    responses run against it with explicit positions. Prompts are right-padded, so each response's
    attention mask has the prompt's padding as a hole and its positions continue from the prompt's
    real length. Response token 0 is predicted by the prompt's last real hidden state.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    split = head_split(model)
    if split is None:
        return None
    decoder, head = split
    try:
        out = decoder(input_ids=sp.prompt_ids, attention_mask=sp.prompt_mask, use_cache=True,
                      past_key_values=DynamicCache())
    except (TypeError, ValueError):  # a decoder without this cache interface
        return None
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window / linear-attention caches: not gathered here
    for layer in cache.layers:
        layer.batch_select_indices(sp.row_prompt)
    last = out.last_hidden_state[torch.arange(sp.prompt_ids.shape[0], device=sp.prompt_ids.device),
                                 sp.prompt_lengths - 1]
    width = sp.response_ids.shape[1]
    positions = sp.prompt_lengths[sp.row_prompt, None] + torch.arange(width, device=sp.response_ids.device)
    attention = torch.cat([sp.prompt_mask[sp.row_prompt], sp.response_mask], dim=1)
    hidden = decoder(input_ids=sp.response_ids, attention_mask=attention, position_ids=positions,
                     past_key_values=cache, use_cache=True).last_hidden_state
    predictors = torch.cat([last[sp.row_prompt, None], hidden[:, :-1]], dim=1)  # [S, Tr, H]
    logits = head(predictors[sp.response_mask])
    token_logps = -F.cross_entropy(logits.float(), sp.response_ids[sp.response_mask], reduction="none")
    rows = sp.response_mask.nonzero(as_tuple=True)[0]
    return torch.zeros(sp.response_ids.shape[0], device=token_logps.device).index_add(0, rows, token_logps)
