"""Which way should a listwise batch pay for each prompt once? Plain vs KV-cache reuse vs packing.

Forward + backward of the policy log-probs of a preference batch (B prompts x n responses, the
project's tiny model and synthetic data), three ways, interleaved and repeated:
- plain:  every (prompt, response) row forwarded whole (prompt n times);
- kv:     prompts once with a KV cache gathered per response (shared_prompt_logps below);
- packed: one row per prompt, [prompt, r1, ..., rn], block-causal 4D mask + position ids
          (batching.preference_logps, rows capped at --row-tokens tokens).
KV-cache reuse is the prototype in this file: it lost to packing and is not in hps_exp.
Prints min / median ms and the ratio to plain, and checks the three agree.

    OMP_NUM_THREADS=1 python benchmarks/prompt_sharing.py [--n 2 4 8 16 32] [--batch 16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved, machine, summary, tiny_setup  # noqa: E402
from hps_exp import batching  # noqa: E402
from hps_exp.samplers import Selection  # noqa: E402

# ---- KV-cache reuse: the measured alternative to packing (kept here, not in hps_exp, since it lost)

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


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def shared_prompts(prompts: list[list[int]], responses: list[list[int]], row_prompt: list[int],
                   pad_id: int) -> "SharedPrompts | None":
    """None when a prompt or response is empty (the prompt-once path needs a token to predict from)."""
    if not prompts or any(len(p) == 0 for p in prompts) or any(len(r) == 0 for r in responses):
        return None
    p_ids, p_mask = _pad(prompts, pad_id)
    r_ids, r_mask = _pad(responses, pad_id)
    return SharedPrompts(p_ids, p_mask, torch.tensor([len(p) for p in prompts]), r_ids, r_mask,
                         torch.tensor(row_prompt, dtype=torch.long))


def shared_prompt_logps(model, sp: SharedPrompts) -> torch.Tensor | None:
    """[S] response log-probs with each prompt forwarded once; None when the model does not allow it.

    The prompts run once with a KV cache; the cache's rows are then gathered per response (an index
    select, so gradients from every response flow back into its prompt's keys and values) and the
    responses run against it with explicit positions. Prompts are right-padded, so each response's
    attention mask has the prompt's padding as a hole and its positions continue from the prompt's
    real length. Response token 0 is predicted by the prompt's last real hidden state.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    head = batching.scoring_head(model)
    if head is None:
        return None
    decoder = batching.unwrap(model).get_decoder()
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


def make_batch(examples, enc, tok, n: int, batch: int, row_tokens: int) -> batching.PreferenceBatch:
    ex, en = examples[:batch], enc[:batch]
    sels = [Selection(tuple(range(n)), n - 1) for _ in ex]
    return batching.preference_batch(ex, en, [torch.zeros(n)] * len(ex), sels, [{}] * len(ex), tok.pad_token_id,
                                     max_row_tokens=row_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--row-tokens", type=int, nargs="+", default=[batching.PACK_ROW_TOKENS],
                    help="packed row caps to compare (one packed arm each)")
    args = ap.parse_args()
    print(machine())
    print(f"fwd+bwd of policy log-probs, {args.batch} prompts x n responses; min/median ms over {args.repeats} "
          f"interleaved repeats; (x) = median / plain median")
    names = ["kv"] + [f"packed<={c}" for c in args.row_tokens]
    print(f"{'n':>3} {'plain':>15} " + " ".join(f"{a:>23}" for a in names) + "  max|diff|")
    for n in args.n:
        examples, enc, tok, model = tiny_setup(n, args.batch)
        batches = {c: make_batch(examples, enc, tok, n, args.batch, c) for c in args.row_tokens}
        pb = batches[args.row_tokens[0]]
        shared = SharedPrompts(*_shared_tensors(pb, enc[:args.batch], tok.pad_token_id))

        def run(fn, model=model):
            model.zero_grad(set_to_none=True)
            fn().sum().backward()

        # the loop's current model / batches bound as defaults: every arm is called within this iteration
        arms = {"plain": lambda model=model, pb=pb: run(lambda: batching.preference_logps(model, pb, pack=False)),
                "kv": lambda model=model, shared=shared: run(lambda: shared_prompt_logps(model, shared))}
        for c, b in batches.items():
            arms[f"packed<={c}"] = lambda model=model, b=b: run(lambda: batching.preference_logps(model, b))
        with torch.no_grad():
            ref = batching.preference_logps(model, pb, pack=False)[pb.mask]
            diff = max([float((shared_prompt_logps(model, shared) - ref).abs().max())] +
                       [float((batching.preference_logps(model, b)[b.mask] - ref).abs().max())
                        for b in batches.values()])
        t = {k: summary(v) for k, v in interleaved(arms, args.repeats).items()}
        base = t["plain"][1]
        cells = [f"{t[a][0] * 1e3:6.1f}/{t[a][1] * 1e3:6.1f} ({t[a][1] / base:4.2f}x)" for a in names]
        print(f"{n:>3} {t['plain'][0] * 1e3:7.1f}/{base * 1e3:7.1f} " + " ".join(f"{c:>23}" for c in cells)
              + f"  {diff:.1e}", flush=True)


def _shared_tensors(pb, enc, pad_id):
    rows = pb.mask.nonzero(as_tuple=True)[0].tolist()
    responses = [r[m].tolist() for r, m in zip(pb.sequences.input_ids, pb.sequences.response_mask)]
    p_ids, p_mask = _pad([e.prompt for e in enc], pad_id)
    r_ids, r_mask = _pad(responses, pad_id)
    return p_ids, p_mask, torch.tensor([len(e.prompt) for e in enc]), r_ids, r_mask, torch.tensor(rows)


if __name__ == "__main__":
    main()
