"""python -m hps_exp.ranked_margins on two finished tiny runs (DPO and PL, with an evaluation reward model): the
margins it writes are the runs' implicit rewards (recomputed here by plain float64 forwards) against the
evaluation reward model's ranking of the held-out replies plus SFT samples; the tables read them; runs of other
pipelines and corrupt cache entries are refused."""
import json
import shutil

import pytest
import torch
from conftest import REPO
from test_end_to_end import run_app

from hps_exp import models, ranked_margins
from hps_exp.batching import encode_examples
from hps_exp.data.schema import read_examples
from hps_exp.reward_models import TrainedRewardModel
from hps_exp.tables import aggregate, collect, paired

ARGS = ["-m", "loss=dpo,pl", "dataset.n_train=60", "dataset.n_test=12", "dataset.n_responses=2", "sft.epochs=1",
        "trainer.epochs=1", "trainer.batch_size=8", "eval.max_prompts=12", "eval.max_new_tokens=8",
        "model.n_embd=64", "logger.mode=disabled", "reward_model=train", "reward_model.subset=half_a",
        "eval.reward_model=trained", "loss.beta=0.5"]
RANKED = "synthetic (ranked)"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked")
    p = run_app([*ARGS, f"hydra.sweep.dir={root}/sweep", f"cache_dir={root}/cache"], cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ranked_margins.main([str(root / "sweep"), "--n", "3", "--max-new-tokens", "8", "--cache-dir", str(root / "cache")])
    return root


def _cache(root, name):
    (entry,) = (root / "cache").glob(f"{name}-*")
    return entry


def _logps(model, enc) -> list[torch.Tensor]:
    """log p(response | prompt), one unpacked float64 forward per (prompt, response)."""
    model = model.double().eval()
    out = []
    with torch.no_grad():
        for e in enc:
            values = []
            for r in e.responses:
                ids = torch.tensor([e.prompt + r])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                values.append(sum(float(logp[len(e.prompt) - 1 + t, tok]) for t, tok in enumerate(r)))
            out.append(torch.tensor(values, dtype=torch.float64))
    return out


def test_margins_are_each_runs_implicit_reward_against_the_evaluation_reward_models_ranking(sweep):
    examples = read_examples(_cache(sweep, "ranked_eval") / "examples.jsonl")
    assert len(examples) == 12 and all(e.n == 2 + 3 for e in examples)   # the dataset pair + 3 SFT samples
    judge = TrainedRewardModel.load(_cache(sweep, "eval_reward_model"))
    annotator = TrainedRewardModel.load(_cache(sweep, "reward_model"))
    prompts = [e.prompt for e in examples for _ in e.responses]
    replies = [r for e in examples for r in e.responses]
    scores = [s for e in examples for s in e.scores]
    assert judge.score_batch(prompts, replies) == pytest.approx(scores, abs=1e-5)   # ranked by the judge...
    assert annotator.score_batch(prompts, replies) != pytest.approx(scores, abs=1e-3)   # ...not by the annotator
    tok, sft = models.load_saved(_cache(sweep, "sft") / "model")
    enc = encode_examples(tok, examples, 256, 512)   # model=gpt2's lengths
    ref = _logps(sft, enc)
    hardest_is_not_the_mean = False
    for job in ("0", "1"):
        out = json.loads((sweep / "sweep" / job / "ranked_margins.json").read_text())
        got = out["eval"][RANKED]
        assert got["sft"] == {"reward_margin": 0.0, "reward_margin_hardest": 0.0}
        _, policy = models.load_saved(sweep / "sweep" / job / "policy")
        r = [0.5 * (p - q) for p, q in zip(_logps(policy, enc), ref)]   # beta 0.5, the ratio reward
        ranks = [sorted(range(e.n), key=lambda i: -e.scores[i]) for e in examples]
        mean = [float(ri[k[0]] - ri[k[1:]].mean()) for ri, k in zip(r, ranks)]   # no ties among float scores
        hard = [float(ri[k[0]] - ri[k[1]]) for ri, k in zip(r, ranks)]
        assert got["per_prompt"]["aligned"]["reward_margin"] == pytest.approx(mean, abs=1e-4)
        assert got["per_prompt"]["aligned"]["reward_margin_hardest"] == pytest.approx(hard, abs=1e-4)
        assert got["aligned"]["reward_margin_hardest"] == pytest.approx(sum(hard) / len(hard), abs=1e-4)
        hardest_is_not_the_mean |= abs(sum(hard) - sum(mean)) > 1e-3
    assert hardest_is_not_the_mean   # the point of ranking: the two margins differ


def test_a_rerun_skips_measured_runs_and_force_gives_the_same_numbers(sweep, capsys):
    job = sweep / "sweep" / "0"
    before = json.loads((job / "ranked_margins.json").read_text())
    argv = [str(job), "--n", "3", "--max-new-tokens", "8", "--cache-dir", str(sweep / "cache")]
    ranked_margins.main(argv)
    assert "1 run(s) already have these ranked margins" in capsys.readouterr().out
    ranked_margins.main([*argv, "--force"])
    assert "(cached " in capsys.readouterr().out   # the ranked set is reused
    after = json.loads((job / "ranked_margins.json").read_text())
    assert after["eval"] == before["eval"] and after["command"].endswith("--force")
    ranked_margins.main([*argv[:2], "4", *argv[3:]])   # another n: another ranked set, measured anew
    assert "already have" not in capsys.readouterr().out


def test_the_tables_show_both_ranked_margins_and_test_them(sweep):
    runs = collect.collect_runs([sweep / "sweep"])
    assert all(RANKED in r.eval and "synthetic" in r.eval for r in runs)
    table = aggregate.main_table(runs, n_boot=200)
    assert [m for e, m in table.columns if e == RANKED] == ["reward_margin", "reward_margin_hardest"]
    tests = paired.paired_tests(runs, "PL", baselines=["DPO"])
    assert {(t.eval_set, t.metric) for t in tests} >= {(RANKED, "reward_margin"), (RANKED, "reward_margin_hardest")}


def test_runs_of_another_pipeline_are_refused_naming_the_stage(sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sweep / "sweep" / "1", other, ignore=shutil.ignore_patterns("policy", "checkpoints"))
    m = json.loads((other / "metrics.json").read_text())
    m["identity"]["stages"] = [[s, "0" * 16 if s == "eval_reward_model" else k] for s, k in m["identity"]["stages"]]
    (other / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="eval_reward_model"):
        ranked_margins.main([str(sweep / "sweep" / "0"), str(other), "--cache-dir", str(sweep / "cache")])


def test_a_corrupt_evaluation_reward_model_is_refused_before_any_work(sweep, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(sweep / "cache", cache)
    weights = max((p for p in _cache(tmp_path, "eval_reward_model").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="hash"):
        ranked_margins.main([str(sweep / "sweep" / "0"), "--cache-dir", str(cache)])
