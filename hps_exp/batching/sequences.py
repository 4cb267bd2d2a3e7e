"""Tokenised examples and padded (prompt, response) rows.

Response masks come from positions (prompt length, sequence length), never from the pad token's
value: with pad == eos (GPT-2 and our tiny model) a value-based mask would drop the real eos.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
