"""Tokenised examples, padded batches and per-sequence log-probabilities.

Response masks come from positions (prompt length, sequence length), never from the pad token's
value: with pad == eos (GPT-2 and our tiny model) a value-based mask would drop the real eos.
"""
from __future__ import annotations

import contextlib
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
# positions). So the model's own forward runs as usual, and a forward pre-hook on its LM head hands
# the head only the scored hidden states: logits are [K, V] instead of [S, T, V]. Because the forward
# is the model's (or its wrapper's) own, DDP's reducer and FSDP2's root hooks (which gather the
# root's parameters, the head's among them) run as they always do: the fast path works wrapped.
# What the forward does after the head runs on the [K, V] logits, so element-wise transforms (Cohere's
# logit_scale, Gemma 2's soft-cap) stay exact; a numerical check once per model catches anything else
# (a transform across positions, a head that is not an nn.Linear): such models take the full forward.

_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def unwrap(model):
    """The transformers model under a DDP and/or PEFT wrapper (FSDP2 shards in place: no wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def head_inputs(head: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """Within the block, `head` sees only the hidden states at (rows, cols): [S, T, H] -> [K, H]."""
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode inside the block (no dropout), each submodule's own mode restored after (a wrapper's mode
    may differ from its inner model's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def scoring_head(model):
    """The LM head (an nn.Linear) whose inputs may be narrowed to the scored positions, checked once per
    model (wrapped or not); None when the model's logits are not head(last hidden state)."""
    try:
        return _HEADS[model]
    except (KeyError, TypeError):
        pass
    head = _find_head(model)
    try:
        _HEADS[model] = head
    except TypeError:
        pass
    return head


def _find_head(model):
    from transformers import PreTrainedModel

    base = unwrap(model)
    if not isinstance(base, PreTrainedModel) or not hasattr(base, "get_output_embeddings"):
        return None
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(head, torch.nn.Linear):
        return None
    # A numerical check on a short input catches a post-head transform across positions (model code we
    # have not read). Eval mode so that dropout does not make the two forwards differ. Under FSDP2 these
    # forwards are collectives: every rank reaches this check at the same step.
    try:
        device = next(model.parameters()).device
        ids = torch.arange(1, 7, device=device).remainder(max(2, head.out_features)).unsqueeze(0)
        rows, cols = torch.zeros(3, dtype=torch.long, device=device), torch.tensor([1, 3, 4], device=device)
        with _eval_mode(model), torch.no_grad(), torch.autocast(device.type, enabled=False):
            full = model(input_ids=ids, use_cache=False).logits.float()[rows, cols]
            with head_inputs(head, rows, cols):
                split = model(input_ids=ids, use_cache=False).logits.float()
        same = full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
    except Exception:  # noqa: BLE001 - any failure means "use the full forward", never a crash
        same = False
    return head if same else None


def scored_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each scored token [K], its row [K]) where scored[s, t] marks input_ids[s, t] as a label.

    Token t is predicted from position t - 1, so position 0 is never scored.
    """
    labels_mask = scored[:, 1:]
    rows, cols = labels_mask.nonzero(as_tuple=True)   # the hidden state at (row, col) predicts col + 1
    labels = input_ids[:, 1:][labels_mask]
    head = scoring_head(model)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logits = logits[labels_mask]
    else:
        with head_inputs(head, rows, cols):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
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
                       autocast: torch.dtype | None = None, pack: bool = True) -> list[torch.Tensor]:
    """log p(response | prompt) for every response of every example: [n_i] per example (the reference cache).

    With pack (and a model that supports it) each prompt is forwarded once with its responses packed
    after it, batch_size responses per forward; otherwise one (prompt, response) row per response.
    """
    model.eval()
    pairs = [(e.prompt, r) for e in encoded for r in e.responses]
    values = torch.empty(len(pairs))
    starts = np.cumsum([0] + [len(e.responses) for e in encoded])
    if pack and all(e.prompt for e in encoded) and packing_supported(model):
        # sort prompts by packed length so rows of a batch are alike; restore order afterwards
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt) + sum(map(len, encoded[i].responses)))
        group: list[int] = []
        for pos, i in enumerate(order):
            group.append(i)
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            if nxt is not None and sum(len(encoded[j].responses) for j in group) + len(encoded[nxt].responses) \
                    <= batch_size:
                continue
            flat = [k for j in group for k in range(starts[j], starts[j + 1])]
            packed = pack_rows([encoded[j].prompt for j in group], [pairs[k][1] for k in flat],
                               [g for g, j in enumerate(group) for _ in encoded[j].responses], pad_id)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                values[flat] = _packed_token_logps(model, packed.to(device)).float().cpu()
            group = []
    else:
        # sort by length so padding waste is small; restore order afterwards
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([pairs[i] for i in idx], pad_id).to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                values[idx] = sequence_logps(model, batch).float().cpu()
    return [values[starts[i]:starts[i + 1]].clone() for i in range(len(encoded))]


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


def preference_lengths(encoded: list[Encoded], all_responses: bool) -> list[int]:
    """Bucketing key of each prompt of a preference set, known before the sampler draws its slots.

    all_responses=False (two slots a prompt, one (prompt, response) row each): prompt + its longest
    response, which bounds the row; True (every response, packed after the prompt): prompt + all
    responses, the packed length.
    """
    if all_responses:
        return [len(e.prompt) + sum(len(r) for r in e.responses) for e in encoded]
    return [len(e.prompt) + max((len(r) for r in e.responses), default=0) for e in encoded]


# ---------------------------------------------------------------- preference batches
#
# A listwise batch holds n responses of the same prompt. Forwarding (prompt, response) rows would
# pay for the prompt n times and pad every response to the longest one. Instead each prompt is
# forwarded once with its responses packed after it in one row ([prompt, r1, r2, ...]); a
# block-causal mask lets each response see the prompt and its own earlier tokens only, and position
# ids restart after the prompt for every response, so each response's log-prob is exactly the one
# of its own (prompt, response) sequence. Rows are capped at PACK_ROW_TOKENS (a prompt whose
# responses do not fit gets several rows, the prompt repeated) because attention cost grows with
# the square of the row length. Chosen over KV-cache reuse by measurement (benchmarks/prompt_sharing.py,
# docs/benchmarks.md): packing also removes the padding between responses, which the cache does not.

PACK_ROW_TOKENS = 256


@dataclass
class PackedRows:
    """The responses of a preference batch packed after their prompts, with what scoring them needs."""
    input_ids: torch.Tensor   # [R, L] right-padded rows: prompt, then responses back to back
    positions: torch.Tensor   # [R, L] position ids: the prompt 0..P-1, each response P..P+len-1
    segments: torch.Tensor    # [R, L] -1 padding, 0 prompt, k >= 1 the row's k-th response
    predictors: torch.Tensor  # [K, 2] (row, column) of the hidden state that predicts each scored token
    labels: torch.Tensor      # [K] the scored tokens
    owner: torch.Tensor       # [K] the response (flat slot index, row-major over the batch's mask) it belongs to
    n_responses: int

    def to(self, device) -> "PackedRows":
        moved = (t.to(device, non_blocking=True) for t in (self.input_ids, self.positions, self.segments,
                                                           self.predictors, self.labels, self.owner))
        return PackedRows(*moved, self.n_responses)


def pack_rows(prompts: list[list[int]], responses: list[list[int]], row_prompt: list[int], pad_id: int,
              max_row_tokens: int = PACK_ROW_TOKENS) -> PackedRows | None:
    """Pack responses (in order; response s belongs to prompts[row_prompt[s]]) after their prompts.

    None when a prompt is empty (no token to predict a response's first token from).
    """
    if any(len(p) == 0 for p in prompts):
        return None
    by_prompt: list[list[int]] = [[] for _ in prompts]
    for s, b in enumerate(row_prompt):
        by_prompt[b].append(s)
    rows: list[tuple[list[int], list[int], list[int]]] = []   # (ids, positions, segments)
    predictors, labels, owner = [], [], []
    for b, prompt in enumerate(prompts):
        P, row = len(prompt), None
        for s in by_prompt[b]:
            r = responses[s]
            if row is None or (len(row[0]) + len(r) > max_row_tokens and len(row[0]) > P):
                row = (list(prompt), list(range(P)), [0] * P)
                rows.append(row)
            ids, pos, seg = row
            start, k, segment = len(ids), len(rows) - 1, seg[-1] + 1
            for t, token in enumerate(r):
                predictors.append((k, P - 1 if t == 0 else start + t - 1))
                labels.append(token)
                owner.append(s)
            ids += r
            pos += range(P, P + len(r))
            seg += [segment] * len(r)
    width = max(len(ids) for ids, _, _ in rows) if rows else 1
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for k, (ids, pos, seg) in enumerate(rows):
        input_ids[k, :len(ids)] = torch.tensor(ids)
        positions[k, :len(ids)] = torch.tensor(pos)
        segments[k, :len(ids)] = torch.tensor(seg)
    return PackedRows(input_ids, positions, segments, torch.tensor(predictors, dtype=torch.long).view(-1, 2),
                      torch.tensor(labels, dtype=torch.long), torch.tensor(owner, dtype=torch.long),
                      len(responses))


def block_causal_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """[R, 1, L, L] mask: a token sees earlier tokens of the prompt and of its own response.

    In the form the attention implementation takes as-is: bool (True = attend) for sdpa, additive
    float for eager; None for any other implementation (flash attention takes no such mask).
    """
    L = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=segments.device)  # no all-masked row (padding queries)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return None


def _packed_token_logps(model, packed: PackedRows) -> torch.Tensor | None:
    head = scoring_head(model)
    if head is None:
        return None
    dtype = next(model.parameters()).dtype
    mask = block_causal_mask(packed.segments, getattr(unwrap(model).config, "_attn_implementation", None) or "",
                             dtype)
    if mask is None:
        return None
    # The model's own forward (through any DDP/FSDP2 wrapper) with the block-causal mask and restarting positions.
    with head_inputs(head, packed.predictors[:, 0], packed.predictors[:, 1]):
        logits = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.positions,
                       use_cache=False).logits
    token_logps = -F.cross_entropy(logits.float(), packed.labels, reduction="none")
    return torch.zeros(packed.n_responses, device=token_logps.device).index_add(0, packed.owner, token_logps)


_PACKING_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def packing_supported(model) -> bool:
    """Whether packed rows give this model's exact per-sequence log-probs; checked once per model.

    A model must honour position ids and a custom 4D mask (absolute/rotary positions do; ALiBi-style
    or flash attention would not), so compare both paths on a tiny input rather than trust a list.
    """
    try:
        return _PACKING_OK[model]
    except (KeyError, TypeError):
        pass
    ok = False
    head = scoring_head(model)
    if head is not None:
        vocab = head.out_features
        prompt, responses = [1, 2, 3], [[4, 5], [6, 7, 8], [9]]
        tokens = lambda ids: [i % vocab for i in ids]  # noqa: E731
        prompt, responses = tokens(prompt), [tokens(r) for r in responses]
        param = next(model.parameters())
        device = param.device
        # fp32 weights: the two paths differ only by summation order; bf16/fp16 weights: by rounding too
        tol = 1e-4 if param.dtype == torch.float32 else 3e-2
        try:
            # eval mode: dropout would make the paths differ; autocast off: the check runs inside a step
            with _eval_mode(model), torch.no_grad(), torch.autocast(device.type, enabled=False):
                want = sequence_logps(model, collate([(prompt, r) for r in responses], 0).to(device))
                got = _packed_token_logps(model, pack_rows([prompt], responses, [0, 0, 0], 0).to(device))
            ok = got is not None and torch.allclose(got, want, rtol=tol, atol=tol)
        except Exception:  # noqa: BLE001 - any failure means "use the plain path", never a crash
            ok = False
    try:
        _PACKING_OK[model] = ok
    except TypeError:
        pass
    return ok


@dataclass
class PreferenceBatch:
    sequences: SequenceBatch      # [S, T] prompt+response per real slot, row-major over `mask`
    mask: torch.Tensor            # [B, M] real slots
    ref_logps: torch.Tensor       # [B, M]
    scores: torch.Tensor          # [B, M] (NaN without scores)
    num_negatives: torch.Tensor   # [B]
    stats: dict[str, float]
    packed: PackedRows | None = None  # the same responses packed after their prompts (None: plain path only)
    weight: int = 0               # real prompts (a rank's padding share has 0): the trainer's loss weight
    sources: tuple = ()           # file:line of each row, named when a step goes non-finite


def preference_batch(examples: list[Example], encoded: list[Encoded], ref: list[torch.Tensor],
                     selections: list[Selection], stats: list[dict], pad_id: int,
                     max_row_tokens: int = PACK_ROW_TOKENS, weight: int | None = None) -> PreferenceBatch:
    """The slots the sampler selected, as padded rows (and packed rows); `weight` = the real prompts among
    them (default: all), the trainer's loss weight."""
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
    packed = pack_rows([enc.prompt for enc in encoded], [r for _, r in pairs], row_prompt, pad_id, max_row_tokens)
    return PreferenceBatch(collate(pairs, pad_id), mask, ref_t, scores,
                           torch.tensor([s.num_negatives for s in selections]), mean_stats, packed,
                           B if weight is None else weight, tuple(e.source for e in examples))


def preference_logps(model, batch: PreferenceBatch, pack: bool = True) -> torch.Tensor:
    """[B, M] policy log-prob of every slot's response given its prompt, 0 on masked slots.

    Packed rows when the batch has them and the model supports them (checked once per model), the
    plain (prompt, response) rows otherwise; pack=False forces the plain path (tests, benchmarks).
    """
    device = next(model.parameters()).device
    mask = batch.mask.to(device)
    flat = None
    if _use_packed(model, batch, pack):
        flat = _packed_token_logps(model, batch.packed.to(device))
    if flat is None:
        flat = sequence_logps(model, batch.sequences.to(device))
    return torch.zeros(mask.shape, device=device).masked_scatter(mask, flat.float())


def _use_packed(model, batch: PreferenceBatch, pack: bool = True) -> bool:
    return pack and batch.packed is not None and packing_supported(model)


def forwarded_tokens(model, batch: PreferenceBatch, pack: bool = True) -> int:
    """Real (non-padding) tokens `preference_logps` feeds the model for this batch: each prompt once on the packed
    path, once per response on the plain one. The unit of the per-token costs (pref_tokens_per_s)."""
    if _use_packed(model, batch, pack):
        return int((batch.packed.segments >= 0).sum())
    return int(batch.sequences.attention_mask.sum())
