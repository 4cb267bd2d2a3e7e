"""Packed rows: each prompt forwarded once with its responses after it, under a block-causal mask.

A listwise batch holds n responses of the same prompt. Forwarding (prompt, response) rows would
pay for the prompt n times and pad every response to the longest one. Instead each prompt is
forwarded once with its responses packed after it in one row ([prompt, r1, r2, ...]); a
block-causal mask lets each response see the prompt and its own earlier tokens only, and position
ids restart after the prompt for every response, so each response's log-prob is exactly the one
of its own (prompt, response) sequence. Rows are capped at PACK_ROW_TOKENS (a prompt whose
responses do not fit gets several rows, the prompt repeated) because attention cost grows with
the square of the row length. Chosen over KV-cache reuse by measurement (benchmarks/prompt_sharing.py,
docs/benchmarks.md): packing also removes the padding between responses, which the cache does not.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hps_exp.batching.scoring import eval_mode, head_inputs, scoring_head, sequence_logps, unwrap
from hps_exp.batching.sequences import collate

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
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)
        return PackedRows(mv(self.input_ids), mv(self.positions), mv(self.segments), mv(self.predictors),
                          mv(self.labels), mv(self.owner), self.n_responses)


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


def packed_token_logps(model, packed: PackedRows) -> torch.Tensor | None:
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
            with eval_mode(model), torch.no_grad(), torch.autocast(device.type, enabled=False):
                want = sequence_logps(model, collate([(prompt, r) for r in responses], 0).to(device))
                packed = pack_rows([prompt], responses, [0, 0, 0], 0)
                assert packed is not None   # None only for an empty prompt; this one has 3 tokens
                got = packed_token_logps(model, packed.to(device))
            ok = got is not None and torch.allclose(got, want, rtol=tol, atol=tol)
        except Exception:  # noqa: BLE001 - any failure means "use the plain path", never a crash
            ok = False
    try:
        _PACKING_OK[model] = ok
    except TypeError:
        pass
    return ok
