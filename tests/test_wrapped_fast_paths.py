"""The head-only log-softmax and the packed listwise rows run through a DDP wrapper and an FSDP2-sharded model
(the module the trainer's step sees), with the same values and gradients as the bare model. A one-rank gloo
group in this process (seconds); tests/test_distributed.py runs the same paths with 2 processes."""
import copy

import pytest
import torch
import torch.distributed as dist

from hps_exp import batching
from tests.test_preference_logps import batch_and_model, value_and_grads


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrapped(model, strategy):
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def full_grads(module):
    return {batching_name(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in module.named_parameters() if p.grad is not None}


def batching_name(name: str) -> str:
    return name.removeprefix("module.")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_fast_paths_run_wrapped_and_equal_the_bare_model(one_rank_group, strategy):
    bare, batch = batch_and_model("gpt2")
    module = wrapped(copy.deepcopy(bare), strategy)
    assert batching.scoring_head(module) is not None and batching.packing_supported(module)
    want, g_want = value_and_grads(bare, batch, pack=False)   # plain rows, bare model
    got, _ = value_and_grads(module, batch, pack=True)         # packed rows through the wrapper
    g_got = full_grads(module)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        assert torch.allclose(g_got[name], g_want[name], atol=1e-5), name
    # The head saw only the scored positions: [K, V] logits, K = the response tokens.
    head, seen = batching.scoring_head(module), []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        batching.sequence_logps(module, batch.sequences)
    handle.remove()
    assert seen == [(int(batch.sequences.response_mask[:, 1:].sum()), head.out_features)]
