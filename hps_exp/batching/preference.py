"""Preference batches (the sampler's slots as padded and packed rows) and their log-probs: the policy's per step,
the reference's for every response once (the reference cache)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hps_exp.batching.packing import PACK_ROW_TOKENS, PackedRows, pack_rows, packed_token_logps, packing_supported
from hps_exp.batching.scoring import sequence_logps
from hps_exp.batching.sequences import Encoded, SequenceBatch, collate
from hps_exp.data.schema import Example
from hps_exp.samplers import Selection


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
        assert batch.packed is not None   # _use_packed checked it
        flat = packed_token_logps(model, batch.packed.to(device))
    if flat is None:
        flat = sequence_logps(model, batch.sequences.to(device))
    return torch.zeros(mask.shape, device=device).masked_scatter(mask, flat.float())


def _use_packed(model, batch: PreferenceBatch, pack: bool = True) -> bool:
    return pack and batch.packed is not None and packing_supported(model)


def forwarded_tokens(model, batch: PreferenceBatch, pack: bool = True) -> int:
    """Real (non-padding) tokens `preference_logps` feeds the model for this batch: each prompt once on the packed
    path, once per response on the plain one. The unit of the per-token costs (pref_tokens_per_s)."""
    if _use_packed(model, batch, pack):
        assert batch.packed is not None   # _use_packed checked it
        return int((batch.packed.segments >= 0).sum())
    return int(batch.sequences.attention_mask.sum())


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
            assert packed is not None   # None only for an empty prompt; every prompt is non-empty (checked above)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                got = packed_token_logps(model, packed.to(device))
                assert got is not None   # packing_supported(model) checked that this model scores packed rows
                values[flat] = got.float().cpu()
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
