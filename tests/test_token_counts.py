"""Real-token counts behind pref_tokens / pref_tokens_per_s: what the forward is fed, summed over a stage
(and resumes)."""
import torch

from hps_exp import batching
from hps_exp.trainer import Trainer
from tests import test_trainer
from tests.test_batching import tiny_model_and_tok
from tests.test_preference_logps import EXAMPLES, SELECTIONS, batch_and_model
from tests.test_trainer import cfg, fresh, loop, make_epoch

plain_step = test_trainer.step


def test_forwarded_tokens_count_each_prompt_once_when_packed_and_per_response_when_plain():
    model, batch = batch_and_model("gpt2")
    _, tok = tiny_model_and_tok()
    enc = batching.encode_examples(tok, EXAMPLES, 32, 64)
    prompt_len = [len(e.prompt) for e in enc]
    resp_len = [[len(r) for r in e.responses] for e in enc]
    chosen = [[resp_len[b][i] for i in sel.indices] for b, sel in enumerate(SELECTIONS)]
    plain = sum(prompt_len[b] * len(c) + sum(c) for b, c in enumerate(chosen))
    packed = sum(prompt_len[b] + sum(c) for b, c in enumerate(chosen))   # one row per prompt at 256 tokens
    assert batching.forwarded_tokens(model, batch, pack=False) == plain
    assert batching.forwarded_tokens(model, batch) == packed < plain


def counting_step(model, batch):
    loss, metrics = plain_step(model, batch)
    return loss, {**metrics, "tokens": float(len(batch[0]))}   # 8 "tokens" per micro-batch


def test_trainer_sums_step_tokens_over_the_stage_and_across_a_resume(tmp_path, monkeypatch):
    out = Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, counting_step)
    assert out["tokens"] == 3 * 8 * 8   # 3 epochs x 8 micro-batches x 8 rows: a sum, not a per-prompt mean
    monkeypatch.setattr(test_trainer, "step", counting_step)
    ckpt = test_trainer._crash_after_checkpoint(tmp_path)   # the step-5 checkpoint of a run that died in step 6
    resumed = Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None,
                      checkpoint=ckpt).fit(make_epoch, 8, counting_step)
    assert resumed["steps"] == 12 and resumed["tokens"] == out["tokens"]   # the steps before the resume count
