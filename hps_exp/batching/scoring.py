"""Log-probs computed at the scored positions only: the LM-head probe and the log-prob kernels.

The LM head and the log-softmax over the vocabulary are the widest tensors of a forward; a
preference or SFT step only needs them where a label is scored (response tokens, ~half the
positions). So the model's own forward runs as usual, and a forward pre-hook on its LM head hands
the head only the scored hidden states: logits are [K, V] instead of [S, T, V]. Because the forward
is the model's (or its wrapper's) own, DDP's reducer and FSDP2's root hooks (which gather the
root's parameters, the head's among them) run as they always do: the fast path works wrapped.
What the forward does after the head runs on the [K, V] logits, so element-wise transforms (Cohere's
logit_scale, Gemma 2's soft-cap) stay exact; a numerical check once per model catches anything else
(a transform across positions, a head that is not an nn.Linear): such models take the full forward.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from hps_exp.batching.sequences import SequenceBatch

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
def eval_mode(model: torch.nn.Module):
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
        with eval_mode(model), torch.no_grad(), torch.autocast(device.type, enabled=False):
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
