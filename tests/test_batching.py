"""Sequence log-probs: masks by position, so pad == eos neither drops the real eos nor counts padding."""
import pytest
import torch
from omegaconf import OmegaConf

from hps_exp import batching, models
from hps_exp.data.schema import Example

TINY = OmegaConf.create({"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64})


def tiny_model_and_tok():
    texts = ["\n\nHuman: how do i bake bread?\n\nAssistant: mix flour and water, then bake it.",
             "\n\nHuman: hi\n\nAssistant: hello there."] * 20
    tok = models.train_tokenizer(texts, vocab_size=300)
    return models.build_tiny(TINY, len(tok), seed=0).eval(), tok


def manual_logp(model, prompt_ids, resp_ids):
    """Unbatched, unpadded: sum of log p(resp token t | all before)."""
    ids = torch.tensor([prompt_ids + resp_ids])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logp[len(prompt_ids) + t - 1, tok_id]) for t, tok_id in enumerate(resp_ids))


def test_pad_equals_eos_and_padding_is_ignored():
    model, tok = tiny_model_and_tok()
    assert tok.pad_token_id == tok.eos_token_id
    ex = Example(prompt="\n\nHuman: hi\n\nAssistant:",
                 responses=(" hello there.", " mix flour and water, then bake it."))
    (enc,) = batching.encode_examples(tok, [ex], max_prompt_length=32, max_length=64)
    assert all(r[-1] == tok.eos_token_id for r in enc.responses)  # eos appended and kept
    batch = batching.collate([(enc.prompt, r) for r in enc.responses], tok.pad_token_id)
    # The short sequence is padded with eos ids; only its real tokens are in the response mask.
    short = len(enc.prompt) + len(enc.responses[0])
    assert batch.response_mask[0].sum() == len(enc.responses[0])
    assert not batch.response_mask[0, short:].any() and (batch.input_ids[0, short:] == tok.eos_token_id).all()
    with torch.no_grad():
        got = batching.sequence_logps(model, batch)
        want = [manual_logp(model, enc.prompt, r) for r in enc.responses]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4)


def test_value_based_mask_would_be_wrong():
    """Guard the reason for position masks: the final eos has the pad id and must be scored."""
    model, tok = tiny_model_and_tok()
    ex = Example(prompt="\n\nHuman: hi\n\nAssistant:", responses=(" hello there.", " hello."))
    (enc,) = batching.encode_examples(tok, [ex], 32, 64)
    batch = batching.collate([(enc.prompt, r) for r in enc.responses], tok.pad_token_id)
    value_mask = (batch.input_ids != tok.pad_token_id) & batch.response_mask
    assert (value_mask.sum(-1) < batch.response_mask.sum(-1)).all()


@pytest.mark.parametrize("pack", [True, False])
def test_all_response_logps_matches_per_sequence_and_keeps_order(pack):
    model, tok = tiny_model_and_tok()
    exs = [Example(prompt="\n\nHuman: hi\n\nAssistant:", responses=(" hello there.", " hi", " mix flour and water.")),
           Example(prompt="\n\nHuman: how do i bake bread?\n\nAssistant:", responses=(" bake it.", " no."))]
    enc = batching.encode_examples(tok, exs, 32, 64)
    got = batching.all_response_logps(model, enc, tok.pad_token_id, batch_size=2, device=torch.device("cpu"),
                                      pack=pack)
    assert batching.packing_supported(model)  # so pack=True really takes the packed path
    assert [len(g) for g in got] == [3, 2]
    with torch.no_grad():
        for e, g in zip(enc, got):
            want = torch.tensor([manual_logp(model, e.prompt, r) for r in e.responses])
            assert torch.allclose(g, want, atol=1e-4)


def test_prompt_truncation_keeps_the_end():
    _, tok = tiny_model_and_tok()
    ex = Example(prompt="\n\nHuman: " + "hello " * 40 + "\n\nAssistant:", responses=(" a b", " c"))
    (enc,) = batching.encode_examples(tok, [ex], max_prompt_length=8, max_length=12)
    assert len(enc.prompt) == 8 and tok.decode(enc.prompt).endswith("Assistant:")
    assert all(len(enc.prompt) + len(r) <= 12 for r in enc.responses)


# ---------------------------------------------------------------- head only at scored positions

def full_vocab_logps(model, batch):
    """The former computation: full forward, log-softmax over every position, then the response mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    token_logps = logits.float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return (token_logps * batch.response_mask[:, 1:]).sum(-1)


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def some_batch(tok):
    exs = [Example(prompt="\n\nHuman: hi\n\nAssistant:", responses=(" hello there.", " mix flour and water.")),
           Example(prompt="\n\nHuman: how do i bake bread?\n\nAssistant:", responses=(" bake it.", " no."))]
    enc = batching.encode_examples(tok, exs, 32, 64)
    return batching.collate([(e.prompt, r) for e in enc for r in e.responses], tok.pad_token_id)


def grads(model, fn, batch):
    model.zero_grad()
    fn(model, batch).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scored_positions_only_equals_full_vocabulary(arch):
    model, tok = tiny_model_and_tok()
    if arch == "llama":
        model = tiny_llama(len(tok))
    assert batching.scoring_head(model) is not None  # the fast path is the one under test
    batch = some_batch(tok)
    got, want = batching.sequence_logps(model, batch), full_vocab_logps(model, batch)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    g_fast, g_full = grads(model, batching.sequence_logps, batch), grads(model, full_vocab_logps, batch)
    assert g_fast.keys() == g_full.keys()
    for name in g_full:
        assert torch.allclose(g_fast[name], g_full[name], atol=1e-5), name
    nll = batching.sequence_nll(model, batch)
    want_nll = -want.sum() / batch.response_mask[:, 1:].sum()
    assert torch.allclose(nll, want_nll, atol=1e-6)


@pytest.mark.parametrize("post", ["scale", "softcap", "mixes_positions"])
def test_post_head_transforms_stay_exact(post):
    """The head sees only the scored positions, but the model's own forward still runs after it: an
    element-wise transform of the logits (Cohere's scale, Gemma 2's soft-cap) stays exact on the fast path;
    one that mixes positions is caught by the numerical check and falls back to the full forward."""
    model, tok = tiny_model_and_tok()
    transforms = {"scale": lambda x: x * 0.5, "softcap": lambda x: 3.0 * torch.tanh(x / 3.0),
                  "mixes_positions": lambda x: x - x.mean(dim=-2, keepdim=True)}

    class Transformed(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = transforms[post](out.logits)
            return out

    other = Transformed(model.config)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert (batching.scoring_head(other) is None) == (post == "mixes_positions")
    batch = some_batch(tok)
    with torch.no_grad():
        assert torch.allclose(batching.sequence_logps(other, batch), full_vocab_logps(other, batch), atol=1e-5)
