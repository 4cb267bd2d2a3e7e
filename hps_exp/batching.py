"""Tokenised examples, padded batches and per-sequence log-probabilities.

Response masks come from positions (prompt length, sequence length), never from the pad token's
value: with pad == eos (GPT-2 and our tiny model) a value-based mask would drop the real eos.
"""
from __future__ import annotations

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


def sequence_logps(model, batch: SequenceBatch) -> torch.Tensor:
    """[S] sum over response tokens of log p(token | everything before it)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.input_ids[:, 1:]
    mask = batch.response_mask[:, 1:]
    # cross_entropy avoids materialising a second [S, T, V] log-softmax tensor
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (token_logps * mask).sum(-1)


def sequence_nll(model, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood per response token (the SFT loss)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.input_ids[:, 1:]
    mask = batch.response_mask[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)


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
