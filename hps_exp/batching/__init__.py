"""From tokenised examples to per-sequence log-probabilities, one module per step of the way:

- sequences: tokenised examples (`Encoded`) and padded (prompt, response) rows (`SequenceBatch`, `collate`);
- scoring: the LM-head probe (`scoring_head`) and the log-prob kernels that run the head on the scored
  positions only (`sequence_logps`, `sequence_nll`);
- packing: a prompt's responses packed after it in one row under a block-causal mask (`pack_rows`,
  `packing_supported`);
- bucketing: batches of similar lengths (`bucketed_batches`, `preference_lengths`);
- preference: the sampler's slots as a batch (`preference_batch`) and its log-probs (`preference_logps`), and the
  reference log-probs of every response (`all_response_logps`).

The stages, tests and benchmarks use them as `batching.X`: the names below are the package's interface.
"""
from hps_exp.batching.bucketing import bucketed_batches, preference_lengths
from hps_exp.batching.packing import PACK_ROW_TOKENS, PackedRows, block_causal_mask, pack_rows, packing_supported
from hps_exp.batching.preference import (
    PreferenceBatch,
    all_response_logps,
    forwarded_tokens,
    preference_batch,
    preference_logps,
)
from hps_exp.batching.scoring import head_inputs, scored_token_logps, scoring_head, sequence_logps, sequence_nll, unwrap
from hps_exp.batching.sequences import Encoded, SequenceBatch, collate, encode_examples

__all__ = [
    "PACK_ROW_TOKENS", "Encoded", "PackedRows", "PreferenceBatch", "SequenceBatch", "all_response_logps",
    "block_causal_mask", "bucketed_batches", "collate", "encode_examples", "forwarded_tokens", "head_inputs",
    "pack_rows", "packing_supported", "preference_batch", "preference_lengths", "preference_logps",
    "scored_token_logps", "scoring_head", "sequence_logps", "sequence_nll", "unwrap",
]
