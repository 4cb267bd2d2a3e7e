"""preference_logps: responses packed after their prompt (block-causal mask) equal the plain path."""
import pytest
import torch

from hps_exp import batching
from hps_exp.data.schema import Example
from hps_exp.samplers import Selection
from tests.test_batching import manual_logp, tiny_llama, tiny_model_and_tok

EXAMPLES = [
    Example(prompt="\n\nHuman: hi\n\nAssistant:",
            responses=(" hello there.", " hi", " mix flour and water, then bake it.", " no.")),
    Example(prompt="\n\nHuman: how do i bake bread?\n\nAssistant:", responses=(" bake it.", " no.")),
    Example(prompt="\n\nHuman: hello\n\nAssistant:", responses=(" hello.", " bread", " mix it.")),
]
# ragged: 4, 2 and 3 real slots, so the [B, M] mask has holes
SELECTIONS = [Selection((0, 2, 1, 3), 3), Selection((0, 1), 1), Selection((2, 0, 1), 2)]


def batch_and_model(arch, max_row_tokens=batching.PACK_ROW_TOKENS, attn="sdpa"):
    model, tok = tiny_model_and_tok()
    if arch == "llama":
        model = tiny_llama(len(tok))
    model.config._attn_implementation = attn
    enc = batching.encode_examples(tok, EXAMPLES, 32, 64)
    ref = [torch.randn(len(e.responses)) for e in enc]
    batch = batching.preference_batch(EXAMPLES, enc, ref, SELECTIONS, [{"a": 1.0}] * 3, tok.pad_token_id,
                                      max_row_tokens=max_row_tokens)
    return model, batch


def value_and_grads(model, batch, pack):
    model.zero_grad()
    out = batching.preference_logps(model, batch, pack=pack)
    weights = torch.arange(1, out.numel() + 1, dtype=out.dtype).view_as(out)  # distinct weight per slot
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,attn,row_tokens", [("gpt2", "sdpa", 256), ("llama", "sdpa", 256),
                                                  ("gpt2", "eager", 256), ("llama", "eager", 256),
                                                  ("gpt2", "sdpa", 20)])
def test_packed_equals_plain_path_values_and_gradients(arch, attn, row_tokens):
    model, batch = batch_and_model(arch, row_tokens, attn)
    packed = batch.packed
    assert packed is not None and batching.packing_supported(model)  # the packed path really runs
    rows = packed.input_ids.shape[0]
    assert rows == 3 if row_tokens == 256 else rows > 3  # one row per prompt, or the cap splits rows
    plain, g_plain = value_and_grads(model, batch, pack=False)
    got, g_packed = value_and_grads(model, batch, pack=True)
    assert plain.shape == (3, 4)
    assert (plain[~batch.mask] == 0).all() and (plain[batch.mask] < 0).all()
    assert torch.allclose(got, plain, atol=1e-5), (got, plain)
    assert g_plain.keys() == g_packed.keys()
    for name in g_plain:
        assert torch.allclose(g_packed[name], g_plain[name], atol=1e-5), name


def test_packed_path_matches_unbatched_manual_logps():
    model, tok = tiny_model_and_tok()
    enc = batching.encode_examples(tok, EXAMPLES, 32, 64)
    batch = batching.preference_batch(EXAMPLES, enc, [torch.zeros(len(e.responses)) for e in enc], SELECTIONS,
                                      [{}] * 3, tok.pad_token_id)
    with torch.no_grad():
        got = batching.preference_logps(model, batch)
    for b, (e, sel) in enumerate(zip(enc, SELECTIONS)):
        for m, i in enumerate(sel.indices):
            with torch.no_grad():
                assert abs(float(got[b, m]) - manual_logp(model, e.prompt, e.responses[i])) < 1e-4


def test_pack_rows_layout():
    packed = batching.pack_rows([[1, 2], [3]], [[4, 5], [6], [7, 8, 9]], [0, 0, 1], pad_id=0, max_row_tokens=64)
    assert packed.input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 8, 9, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert packed.segments.tolist() == [[0, 0, 1, 1, 2], [0, 1, 1, 1, -1]]
    assert packed.labels.tolist() == [4, 5, 6, 7, 8, 9]
    assert packed.owner.tolist() == [0, 0, 1, 2, 2, 2]
    # response 1 (token 6) is predicted from the prompt's last token, not from response 0's end
    assert packed.predictors.tolist() == [[0, 1], [0, 2], [0, 1], [1, 0], [1, 1], [1, 2]]
    mask = batching.block_causal_mask(packed.segments, "sdpa", torch.float32)[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True]   # response 1 sees the prompt and itself only
    capped = batching.pack_rows([[1, 2]], [[4, 5], [6]], [0, 0], pad_id=0, max_row_tokens=4)
    assert capped.input_ids.tolist() == [[1, 2, 4, 5], [1, 2, 6, 0]]  # a row full: the prompt again


def test_model_that_fails_the_packing_check_uses_the_plain_path():
    model, batch = batch_and_model("gpt2")

    odd = type(model)(model.config)
    odd.load_state_dict(model.state_dict())
    odd.eval()
    forward = odd.transformer.forward

    def ignores_positions(*args, position_ids=None, **kwargs):
        """Position ids dropped: packed responses would be scored at the wrong positions."""
        return forward(*args, **kwargs)

    odd.transformer.forward = ignores_positions
    assert not batching.packing_supported(odd)
    with torch.no_grad():
        want = batching.sequence_logps(odd, batch.sequences)
        got = batching.preference_logps(odd, batch)
    assert torch.allclose(got[batch.mask], want, atol=1e-6)


def test_lora_wrapped_model_takes_the_fast_paths():
    peft = pytest.importorskip("peft")
    model, batch = batch_and_model("gpt2")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                      fan_in_fan_out=True, init_lora_weights=False)).eval()
    assert batching.scoring_head(lora) is not None and batching.packing_supported(lora)
    plain, g_plain = value_and_grads(lora, batch, pack=False)
    got, g_packed = value_and_grads(lora, batch, pack=True)
    assert torch.allclose(got, plain, atol=1e-5)
    assert g_plain.keys() == g_packed.keys() and any("lora" in k for k in g_plain)
    for name in g_plain:
        assert torch.allclose(g_packed[name], g_plain[name], atol=1e-5), name
