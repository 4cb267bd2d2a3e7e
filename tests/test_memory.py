"""The memory planner (python -m hps_exp.memory) against what small CPU runs really hold: parameters, gradients
and AdamW states to the byte after a real optimiser step, and the activations autograd saves for backward within
1 % for other layer counts, vocabularies and token counts than those it was measured on (measured: <= 0.15 %)."""
import math

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from hps_exp import memory, models

LLAMA = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
GPT2 = GPT2Config(n_embd=96, n_head=4, n_layer=3, vocab_size=1000, n_positions=128)


def setting(**kw):
    return memory.Setting(**{"strategy": "none", "world_size": 1, "dtype": "fp32", "precision": "fp32",
                             "batch_size": 4, "responses": 2, "max_length": 32, "checkpointing": False,
                             "score_batch_size": 8, **kw})


def held_after_a_step(model):
    """(parameters, gradients, AdamW states) in bytes after one real optimiser step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=torch.randint(0, 1000, (2, 16))).logits.float().logsumexp(-1).sum().backward()
    opt.step()
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    return (memory.tensor_bytes(model.parameters()), memory.tensor_bytes(p.grad for p in trainable),
            memory.tensor_bytes(states))


@pytest.mark.parametrize("lora", [False, True])
def test_parameters_gradients_and_adamw_states_are_what_a_real_step_holds(lora):
    from transformers import AutoModelForCausalLM

    lora_cfg = {"enabled": lora, "r": 4}
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(LLAMA)
    if lora:
        real = models.apply_lora(real, lora_cfg)
    rows = memory.plan(memory.meta_model(LLAMA, "fp32", lora_cfg), LLAMA, setting(), memory.ActivationFit(0, 0, 0))
    assert (rows["parameters"], rows["gradients"], rows["AdamW states (2 moments)"]) == held_after_a_step(real)
    assert rows["fsdp2 gathered blocks (2 in flight)"] == 0


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("compute", ["fp32", "bfloat16 autocast", "bfloat16 parameters (fsdp2)"])
def test_activations_scale_from_the_cut_down_model_to_other_layers_vocab_and_tokens(config, compute):
    from transformers import AutoModelForCausalLM

    fit = memory.fit_activations(config, compute, "fp32")   # 1-2 layers, vocab 256/512, 1-2 x 64 tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)        # 3 layers, vocab 1000, 2 x 100 tokens
    if compute.endswith("(fsdp2)"):
        model.to(torch.bfloat16)
    models.disable_dropout(model)
    measured = memory.saved_bytes(model, torch.randint(0, 1000, (2, 100)), compute)
    predicted = fit.bytes(200, memory.shape_of(config), checkpointing=False, compute_bytes=4)
    assert predicted == pytest.approx(measured, rel=0.01)


def test_fsdp2_shards_states_and_adds_gathered_blocks():
    model = memory.meta_model(LLAMA, "fp32")
    one = memory.plan(model, LLAMA, setting(), memory.ActivationFit(0, 0, 0))
    four = memory.plan(model, LLAMA, setting(strategy="fsdp2", world_size=4, precision="bf16"),
                       memory.ActivationFit(0, 0, 0))
    for row in ("parameters", "gradients", "AdamW states (2 moments)"):
        assert four[row] == math.ceil(one[row] / 4)
    block = memory.block_bytes(model)
    assert four["fsdp2 gathered blocks (2 in flight)"] == 2 * block // 2   # two blocks, gathered in bf16
    assert setting(strategy="fsdp2", world_size=4, precision="bf16").compute == "bfloat16 parameters (fsdp2)"


def test_command_line_plans_a_known_shape_and_names_bad_inputs(capsys):
    text = memory.main(["model.name_or_path=known:smollm2-135m", "trainer.strategy=fsdp2", "world_size=4",
                        "trainer.batch_size=8", "model.max_length=64"])
    n = sum(p.numel() for p in memory.meta_model(memory.model_config({"name_or_path": "known:smollm2-135m"}),
                                                  "fp32").parameters())
    assert n == 134_515_008   # SmolLM2-135M's published parameter count
    assert f"| parameters | {n * 4 / 4 / memory.GIB:.2f} |" in text and "LoRA r=16" in text
    assert "2 prompts x 2 sequences x 64" in text and "vLLM KV cache per token" in text
    with pytest.raises(memory.MemoryPlanError, match="world_size=0"):
        memory.main(["world_size=0"])
    with pytest.raises(memory.MemoryPlanError, match="model.name_or_path='known:nope'"):
        memory.main(["model.name_or_path=known:nope"])
