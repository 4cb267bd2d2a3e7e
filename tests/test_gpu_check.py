"""benchmarks/gpu_check.py's CPU-side logic: the FLOP count behind its MFU against torch's own FLOP counter, the
device peak table, the report, the one-line exit without a GPU, and (slow) every check run on CPU at tiny sizes."""
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

sys.path.insert(0, str(REPO))
from benchmarks import gpu_check  # noqa: E402


@pytest.mark.parametrize("config", [GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=300, n_positions=64),
                                    LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4, vocab_size=300)],
                         ids=["gpt2", "llama"])
def test_flops_per_token_match_torchs_flop_counter(config):
    """6 x matmul parameters + 12 x layers x hidden x sequence per token = what FlopCounterMode counts for a
    forward and backward (matmuls and attention; element-wise ops are not FLOPs there either)."""
    from torch.utils.flop_counter import FlopCounterMode

    # eager attention: its products are plain matmuls that the counter sees (CPU sdpa kernels are not all counted)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = torch.randint(0, 300, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    assert gpu_check.train_flops_per_token(model, 32) * ids.numel() == pytest.approx(counter.get_total_flops(),
                                                                                   rel=1e-3)


def test_peak_table_and_report():
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("Some Future GPU") is None
    text = gpu_check.render([{"check": "a", "status": "ok", "step_s": 0.123456, "n": 3}], "# head")
    assert text.splitlines() == ["# head", "", "| check | status | numbers |", "|---|---|---|",
                                 "| a | ok | step_s=0.1235, n=3 |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device visible" in out[0] and not (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_every_check_runs_on_cpu_at_tiny_sizes(tmp_path):
    assert gpu_check.main(["--cpu", "--steps", "2", "--out", str(tmp_path / "r.md")]) == 0
    report = (tmp_path / "r.md").read_text()
    assert report.count("| ok |") == 6 and "FAIL" not in report and "ERROR" not in report
