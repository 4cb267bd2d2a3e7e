"""preference_logps: the prompt-once path (KV cache gathered per response) equals the plain path."""
import pytest
import torch

from hps_exp import batching
from hps_exp.data.schema import Example
from hps_exp.samplers import Selection
from tests.test_batching import tiny_llama, tiny_model_and_tok

EXAMPLES = [
    Example(prompt="\n\nHuman: hi\n\nAssistant:",
            responses=(" hello there.", " hi", " mix flour and water, then bake it.", " no.")),
    Example(prompt="\n\nHuman: how do i bake bread?\n\nAssistant:", responses=(" bake it.", " no.")),
    Example(prompt="\n\nHuman: hello\n\nAssistant:", responses=(" hello.", " bread", " mix it.")),
]
# ragged: 4, 2 and 3 real slots, so the [B, M] mask has holes
SELECTIONS = [Selection((0, 2, 1, 3), 3), Selection((0, 1), 1), Selection((2, 0, 1), 2)]


def batch_and_model(arch):
    model, tok = tiny_model_and_tok()
    if arch == "llama":
        model = tiny_llama(len(tok))
    enc = batching.encode_examples(tok, EXAMPLES, 32, 64)
    ref = [torch.randn(len(e.responses)) for e in enc]
    batch = batching.preference_batch(EXAMPLES, enc, ref, SELECTIONS, [{"a": 1.0}] * 3, tok.pad_token_id)
    return model, batch


def value_and_grads(model, batch, share):
    model.zero_grad()
    out = batching.preference_logps(model, batch, share_prompts=share)
    weights = torch.arange(1, out.numel() + 1, dtype=out.dtype).view_as(out)  # distinct weight per slot
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompt_once_equals_plain_path_values_and_gradients(arch):
    model, batch = batch_and_model(arch)
    assert batch.shared is not None and batch.shared.prompt_ids.shape[0] == 3
    assert len(set(batch.shared.prompt_lengths.tolist())) > 1  # prompts of different lengths (padding holes)
    with torch.no_grad():  # the prompt-once path really runs for this model (no silent fallback)
        assert batching.shared_prompt_logps(model, batch.shared) is not None
    plain, g_plain = value_and_grads(model, batch, share=False)
    shared, g_shared = value_and_grads(model, batch, share=True)
    assert plain.shape == (3, 4)
    assert (plain[~batch.mask] == 0).all() and (plain[batch.mask] < 0).all()
    assert torch.allclose(shared, plain, atol=1e-5), (shared, plain)
    assert g_plain.keys() == g_shared.keys()
    for name in g_plain:
        assert torch.allclose(g_shared[name], g_plain[name], atol=1e-5), name


def test_plain_path_matches_unbatched_manual_logps():
    from tests.test_batching import manual_logp

    model, tok = tiny_model_and_tok()
    enc = batching.encode_examples(tok, EXAMPLES, 32, 64)
    batch = batching.preference_batch(EXAMPLES, enc, [torch.zeros(len(e.responses)) for e in enc], SELECTIONS,
                                      [{}] * 3, tok.pad_token_id)
    with torch.no_grad():
        got = batching.preference_logps(model, batch, share_prompts=True)
        for b, (e, sel) in enumerate(zip(enc, SELECTIONS)):
            for m, i in enumerate(sel.indices):
                assert abs(float(got[b, m]) - manual_logp(model, e.prompt, e.responses[i])) < 1e-4


def test_model_without_a_head_split_uses_the_plain_path():
    model, batch = batch_and_model("gpt2")

    class Halved(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    halved = Halved(model.config)
    halved.load_state_dict(model.state_dict())
    halved.eval()
    assert batching.shared_prompt_logps(halved, batch.shared) is None
    with torch.no_grad():
        want = batching.sequence_logps(halved, batch.sequences)
        got = batching.preference_logps(halved, batch, share_prompts=True)
    assert torch.allclose(got[batch.mask], want, atol=1e-6)
