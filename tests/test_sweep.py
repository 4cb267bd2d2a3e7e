"""The sweep runner (hps_exp/sweep/) and the grid files (sweeps/*.yaml, sweeps/wandb/*.yaml)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hps_exp import config
from hps_exp import sweep as sw
from hps_exp.plan import loss_and_sampler
from hps_exp.samplers import check_compatible


def preference_model(loss, cfg):
    """The table row's preference model: the loss describes itself."""
    return loss.preference_model

REPO = Path(__file__).resolve().parents[1]

# name -> (jobs per arm); a new sweep file needs an entry here.
EXPECTED = {
    "main_small": {"BT": 25, "PL": 25, "HPS": 25, "HPS-full": 25},
    "main_dpo_small": {"DPO-BT": 5, "DPO-PL": 5, "DPO-HPS": 5, "DPO-HPS-full": 5},
    "n_ablation_small": {"DPO-BT": 20, "DPO-PL": 20, "DPO-HPS": 20, "DPO-HPS-full": 20},
    "gamma_ablation_small": {"HPS-full": 75, "HPS-single-step": 15},
    "authors_small": {"DPO": 5, "DPO-authors": 5},
    "main_paper": {"BT": 15, "PL": 15, "HPS": 15, "HPS-full": 15},
    "n_ablation_paper": {"DPO-BT": 12, "DPO-PL": 12, "DPO-HPS": 12, "DPO-HPS-full": 12},
    "beyond_small": {"DPO-BT": 5, "DPO-HPS": 5, "LiPO": 5, "HPS-policy-hard": 5, "HPS-policy-logp": 5,
                     "SimPO-BT": 5, "SimPO-HPS": 5, "SimPO-HPS-lr2e-4": 5},
    "smollm2_hh_tune": {"DPO": 4, "BT": 4, "PL": 4, "HPS": 4, "HPS-full": 4, "HPS-released": 4},
    "smollm2_hh": {"DPO": 1, "BT": 1, "PL": 1, "HPS": 1, "HPS-full": 1, "HPS-released": 1},
    "smollm2_hh_tuned": {"DPO": 1, "BT": 1, "PL": 1, "HPS": 1, "HPS-full": 1, "HPS-released": 1},
}
# The real-model grids (SmolLM2 on the HH-RLHF file): one shared pipeline, seeds by trainer.seed.
# smollm2_hh(_tuned): one seed per launch (trainer.seed=0|1|2)
REAL = {"smollm2_hh_tune": {0}, "smollm2_hh": {0}, "smollm2_hh_tuned": {0}}
PAPER = {"main_paper", "n_ablation_paper"}
SMALL_SEEDS, PAPER_SEEDS = {0, 1, 2, 3, 4}, {0, 1, 2}
# Grids that compare preference models name the treatment of the tables' paired test.
COMPARED = {"main_small", "main_dpo_small", "n_ablation_small", "main_paper", "n_ablation_paper"}


_COMPOSED: dict = {}


@pytest.fixture
def compose(compose):
    """conftest's compose, memoised: the grids' jobs are composed by several tests (100 jobs in main_small)."""
    import copy

    def cached(overrides=()):
        key = tuple(sorted(overrides))  # merge() leaves one override per key, so the order carries no meaning
        if key not in _COMPOSED:
            _COMPOSED[key] = compose(list(overrides))
        return copy.deepcopy(_COMPOSED[key])  # callers resolve the sampler in place
    return cached


def config_has(compose, dotted):
    """Whether the app's config has a key (a key the lead adds may not be merged into this branch yet)."""
    from omegaconf import OmegaConf

    return OmegaConf.select(compose([]), dotted, default="__absent__") != "__absent__"
# Values for `requires` keys when composing (compose never opens the file).
REQUIRED_VALUES = {"dataset.path": "/data/hh_ranked/train.jsonl"}


def test_every_sweep_file_is_listed():
    assert set(sw.available()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sweep_parses_and_expands_to_expected_jobs(name):
    s = sw.load(name)
    assert s.description.strip()
    jobs = sw.jobs(s)
    assert {arm: len(j) for arm, j in jobs.items()} == EXPECTED[name]
    # Every job of the sweep is a distinct setting (no two jobs train the same thing).
    settings = [frozenset(j) for arm_jobs in jobs.values() for j in arm_jobs]
    assert len(set(settings)) == len(settings)
    for arm, arm_jobs in jobs.items():
        for job in arm_jobs:
            keys = [sw.key_of(o) for o in job]
            assert len(keys) == len(set(keys)), f"{name}/{arm}: a key set twice in {job}"
            assert all(o in job for o in s.arms[arm] if "," not in o)  # the arm's own overrides reach each job


def hydra_basic_sweeper_jobs(overrides):
    """The jobs Hydra's own basic sweeper launches for a multirun with these overrides, in job-number order: the
    referee of sw.expand, which uses only Hydra's public override parser."""
    sweeper = pytest.importorskip("hydra._internal.core_plugins.basic_sweeper",
                                  reason="Hydra moved its basic sweeper; the referee is gone")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in sweeper.BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_jobs_are_the_ones_hydras_multirun_launches(name):
    s = sw.load(name)
    extra = [f"{k}={REQUIRED_VALUES[k]}" for k in s.requires] + ["seed=0,3", "trainer.lr=1e-4"]
    for arm, arm_jobs in sw.jobs(s, extra).items():
        assert arm_jobs == hydra_basic_sweeper_jobs(sw.arm_overrides(s, arm, extra)), f"{name}/{arm}"


def test_expansion_keeps_hydras_value_syntax():
    """Quoted values, lists, choice/sort/range sweeps and +/~ prefixes expand as Hydra's multirun does."""
    overrides = ["+experiment=hps_released", "~sampler.gamma", "eval.datasets=[a,b]", "model.name_or_path='x,y'",
                 "seed=choice(2,0)", "loss.beta=sort(0.5,0.1)", "loss=dpo,hps", "dataset.path=/d/a b.jsonl",
                 "trainer.epochs=range(1,3)"]
    assert sw.expand(overrides) == hydra_basic_sweeper_jobs(overrides)
    assert len(sw.expand(overrides)) == 16
    for axis in ("loss.beta=interval(0.1,0.5)", "loss=glob(*)"):  # Hydra's basic sweeper refuses these too
        with pytest.raises(sw.SweepError, match=axis.split("=")[0]):
            sw.expand(["seed=0,1", axis])


def _compose_job(compose, name, job):
    s = sw.load(name)
    if any(sw.key_of(o) == "eval.datasets" for o in job) and not config_has(compose, "eval.datasets"):
        pytest.skip("eval.datasets is not in this config yet (added by the evaluation stage)")
    extra = [f"{k}={REQUIRED_VALUES[k]}" for k in s.requires]
    return compose(sw.merge(job, extra))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_job_composes_and_builds(compose, name):
    """Each job's overrides compose with Hydra, and its loss + sampler build and suit the data."""
    s = sw.load(name)
    seen = set()
    for arm, arm_jobs in sw.jobs(s).items():
        for job in arm_jobs:
            cfg = _compose_job(compose, name, job)
            assert cfg.sweep == name
            loss, sampler = loss_and_sampler(cfg)  # resolves sampler=auto in cfg
            if cfg.dataset.name == "synthetic":
                max_n = cfg.dataset.n_responses
            elif name in REAL:   # the HH pair + the sampled responses (DPO: the dataset's pair, raw)
                assert cfg.dataset.name == "hh_rlhf"
                if cfg.augment.name == "none":
                    assert cfg.loss.name == "dpo" and cfg.sampler.name == "pair"
                    steps, max_n = cfg.trainer.max_steps, 2
                else:
                    assert cfg.augment.name == "sample" and cfg.trainer.max_steps is None
                    steps, max_n = cfg.augment.max_prompts * cfg.trainer.epochs // cfg.trainer.batch_size, \
                        2 + cfg.augment.n
                assert steps == 32   # the same preference steps for every arm
            else:  # paper scale: ranked files with n scored responses per prompt
                assert cfg.dataset.name == "ranked_jsonl" and name in PAPER
                max_n = 16
            check_compatible(loss.input_kind, loss.needs_scores, cfg.loss.name, sampler, cfg.sampler.name,
                             max_n, True)
            seen.add((arm, cfg.loss.name, cfg.loss.framework, cfg.sampler.name,
                      cfg.trainer.seed if name in REAL else cfg.seed))
            if name in REAL:   # tuning: on validation prompts carved from the training prompts, never on test
                assert cfg.model.name == "smollm2_135m"
                assert cfg.eval.split == ("validation" if name.endswith("_tune") else "test")
                assert cfg.eval.validation_prompts == 64   # the same training prompts in both steps
                assert cfg.eval.reward_model == "trained"   # never the annotation reward model
            elif name in PAPER:
                assert cfg.trainer.device == "cuda" and cfg.model.name_or_path
            else:
                assert cfg.model.name == "tiny" and cfg.dataset.n_train <= 200
    assert {seed for *_, seed in seen} == REAL.get(name, PAPER_SEEDS if name in PAPER else SMALL_SEEDS)
    assert (s.compare.get("treatment") == "HPS") == (name in COMPARED)
    if name in COMPARED:
        assert s.compare["baselines"] == ["BT", "PL"]  # HPS-full is a variant of the treatment, not a baseline


def test_the_tuned_sweep_is_the_base_plus_each_arms_tuned_values():
    """sweeps/smollm2_hh_tuned.yaml is generated (hps_exp.tune --write-sweep): the base file's settings and arms, each
    arm with only its tuned loss.beta and trainer.lr added; an edit of the base without regenerating fails here."""
    base, tuned = sw.load("smollm2_hh"), sw.load("smollm2_hh_tuned")
    assert tuned.fixed == base.fixed and list(tuned.arms) == list(base.arms)
    for arm, overrides in base.arms.items():
        added = tuned.arms[arm][len(overrides):]
        assert tuned.arms[arm][:len(overrides)] == overrides
        assert [sw.key_of(o) for o in added] == ["loss.beta", "trainer.lr"], arm


def test_main_small_is_the_full_product(compose):
    s = sw.load("main_small")
    got: dict = {}
    for arm, arm_jobs in sw.jobs(s).items():
        for job in arm_jobs:
            cfg = compose(job)
            loss, _ = loss_and_sampler(cfg)
            got.setdefault(arm, set()).add((cfg.loss.framework, preference_model(loss, cfg), cfg.sampler.name,
                                            cfg.seed))
    frameworks = ("dpo", "ipo", "exo", "sppo", "nca")
    for arm, (pm, sampler) in {"BT": ("BT", "best_worst"), "PL": ("PL", "all"), "HPS": ("HPS", "hard")}.items():
        assert got[arm] == {(fw, pm, sampler, seed) for fw in frameworks for seed in range(5)}, arm
    # Full HPS: all responses; its row is "HPS-full" where the loss labels itself so.
    assert {(fw, sampler, seed) for fw, _, sampler, seed in got["HPS-full"]} == {
        (fw, "all", seed) for fw in frameworks for seed in range(5)}
    assert {pm for _, pm, _, _ in got["HPS-full"]} <= {"HPS", "HPS-full"}


@pytest.mark.parametrize("name, hps, full", [
    ("main_small", "HPS", "HPS-full"), ("main_dpo_small", "DPO-HPS", "DPO-HPS-full"),
    ("n_ablation_small", "DPO-HPS", "DPO-HPS-full"), ("main_paper", "HPS", "HPS-full"),
    ("n_ablation_paper", "DPO-HPS", "DPO-HPS-full")])
def test_hps_arm_is_the_papers_estimator_at_equal_steps(compose, name, hps, full):
    """The HPS row is the paper's one-sample estimator (hard sampler, one negative, log N); HPS-full is the full
    estimator; every arm of the grid trains on the same data, batch and epochs (equal preference steps)."""
    s = sw.load(name)
    jobs = sw.jobs(s)
    extra = [f"{k}={REQUIRED_VALUES[k]}" for k in s.requires]
    strip = [o for o in s.fixed if sw.key_of(o) == "eval.datasets"]  # composes only once the app has the key
    first = {arm: compose(sw.merge([o for o in j[0] if o not in strip], extra)) for arm, j in jobs.items()}
    cfg = first[hps]
    loss, _ = loss_and_sampler(cfg)
    assert (preference_model(loss, cfg), cfg.loss.estimator, cfg.loss.log_n) == ("HPS", "single", True)
    assert (cfg.sampler.name, cfg.sampler.num_negatives) == ("hard", 1)
    full_cfg = first[full]
    loss_and_sampler(full_cfg)
    assert (full_cfg.loss.estimator, full_cfg.sampler.name) == ("full", "all")
    steps = {(c.dataset.get("n_train"), c.dataset.get("path"), c.trainer.batch_size, c.trainer.grad_accum,
              c.trainer.epochs) for c in first.values()}
    assert len(steps) == 1, steps


def test_gamma_and_authors_arms_couple_their_overrides(compose):
    g = sw.jobs(sw.load("gamma_ablation_small"))
    gammas = {compose(j).loss.gamma for j in g["HPS-full"]}
    assert gammas == {0, 0.5, 1, 2, 5}
    single = compose(g["HPS-single-step"][0])
    assert (single.loss.estimator, single.sampler.name, single.sampler.schedule) == ("single", "hard", "step")
    a = sw.jobs(sw.load("authors_small"))
    authors = compose(a["DPO-authors"][0])
    assert (authors.loss.name, authors.sampler.name, authors.sampler.num_negatives) == ("dpo", "hard", 1)
    assert (authors.loss.beta, authors.loss.label_smoothing) == (0.25, 0.1)
    # The arm is the preset itself: the grid's fixed overrides leave its loss, sampler and resampling alone.
    preset = compose(["+experiment=hps_released"])
    assert (authors.loss, authors.sampler, authors.trainer.resample) == (preset.loss, preset.sampler,
                                                                         preset.trainer.resample)
    assert authors.sampler.schedule != "constant"
    plain = compose(a["DPO"][0])
    assert (plain.loss.beta, plain.loss.label_smoothing, plain.sampler.name) == (0.1, 0.0, "auto")


def test_precedence_extra_over_arm_over_grid_over_fixed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"arms": {"A": ["loss=hps", "seed=9"], "B": ["loss=bt"]},
                                    "grid": {"seed": "0,1", "loss.beta": [0.1, 0.2]},
                                    "fixed": ["loss.beta=0.3", "sft.epochs=1"]}))
    s = sw.load(str(path))
    assert s.name == "p"
    jobs = sw.jobs(s)
    assert len(jobs["A"]) == 2 and len(jobs["B"]) == 4  # A's seed=9 replaces the seed axis
    assert all("seed=9" in j for j in jobs["A"])
    assert all("loss.beta=0.3" not in j for j in jobs["B"])  # the grid axis beats the fixed value
    extra = sw.jobs(s, ["seed=5", "loss.beta=0.7"])
    assert [len(extra["A"]), len(extra["B"])] == [1, 1]
    assert "seed=5" in extra["A"][0] and "loss.beta=0.7" in extra["B"][0]


@pytest.mark.parametrize("text, named", [
    ("arms: {A: [loss=bt]}\nbogus: 1\n", ["bogus"]),
    ("arms: {}\n", ["'arms'"]),
    ("arms: {'a/b': [loss=bt]}\n", ["'a/b'"]),
    ("arms: {A: loss=bt}\n", ["arms.A", "loss=bt"]),
    ("arms: {A: [loss=bt]}\nfixed: [seed]\n", ["fixed", "'seed'"]),
    ("arms: {A: [loss=bt]}\ngrid: {seed: '0,,1'}\n", ["grid.seed", "0,,1"]),
    ("arms: {A: [loss=bt]}\ngrid: {seed: [[0, 1]]}\n", ["grid.seed", "[0, 1]"]),
    ("- 1\n", []),
    ("arms: {A: [loss=bt]}\ncompare: {treatment: [HPS]}\n", ["'compare'", "['HPS']"]),
    ("arms: {A: [loss=bt]}\ncompare: {treatment: HPS, baselines: BT}\n", ["'compare'", "'BT'"]),
    ("arms: {A: [loss=bt]}\ncompare: {treatment: HPS, against: [BT]}\n", ["'compare'", "'against'"]),
])
def test_bad_sweep_file_is_an_error(tmp_path, text, named):
    """Each error names the file and the key or value at fault (the wording around them is free)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(sw.SweepError) as e:
        sw.load(str(path))
    for part in [str(path), *named]:
        assert part in str(e.value)


def test_runner_owns_the_sweep_dir(capsys):
    assert sw.main(["main_dpo_small", "--dry-run", "hydra.sweep.dir=/tmp/x"]) == 2
    assert "--jobs-dir" in capsys.readouterr().err
    # An extra sweep= relabels the jobs instead of adding a second sweep key.
    job = sw.jobs(sw.load("main_dpo_small"), ["sweep=mine"])["DPO-BT"][0]
    assert [o for o in job if o.startswith("sweep=")] == ["sweep=mine"]


def test_unknown_name_lists_available(capsys):
    assert sw.main(["no_such_sweep"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_sweep'" in err
    for name in EXPECTED:
        assert name in err


def test_dry_run_prints_commands_and_launches_nothing(tmp_path, capsys):
    jobs_dir = tmp_path / "jobs"
    assert sw.main(["main_dpo_small", "--dry-run", "--jobs-dir", str(jobs_dir), "trainer.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert "20 job(s)" in out and "nothing launched" in out
    commands = [line.strip() for line in out.splitlines() if " -m hps_exp -m " in line]
    assert len(commands) == 4
    for arm, cmd in zip(("DPO-BT", "DPO-PL", "DPO-HPS", "DPO-HPS-full"), commands):
        assert cmd.endswith(f"hydra.sweep.dir={jobs_dir / arm} 'hydra.sweep.subdir=${{hydra.job.num}}'")
        assert "sweep=main_dpo_small" in cmd
        assert "seed=0,1,2,3,4" in cmd and "trainer.lr=5e-4" in cmd
    assert not jobs_dir.exists()


def test_required_keys(capsys):
    assert sw.main(["main_paper"]) == 2
    assert "dataset.path=..." in capsys.readouterr().err
    assert sw.main(["main_paper", "--dry-run"]) == 0
    assert "dataset.path=..." in capsys.readouterr().out
    assert sw.main(["main_paper", "--dry-run", "dataset.path=/x.jsonl"]) == 0
    assert "60 job(s)" in capsys.readouterr().out


def test_make_sweep_target_runs_the_runner():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-s", "sweep", "SWEEP=authors_small", "ARGS=--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "10 job(s) in 2 arm(s)" in r.stdout
    r = subprocess.run(["make", "-n", "table", "SWEEP=authors_small"], cwd=REPO, capture_output=True, text=True)
    assert "-m hps_exp.tables outputs/sweeps/authors_small" in r.stdout


# ------------------------------------------------------------------------------------------ W&B sweeps

SMALL = sorted(n for n in EXPECTED if n.endswith("_small"))


def test_wandb_files_are_generated_from_the_grids():
    """sweeps/wandb/ holds exactly what `--write-wandb` makes of the small grids (so they cannot drift)."""
    expected = {}
    for name in SMALL:
        for stem, spec in sw.wandb_sweeps(sw.load(name)).items():
            expected[f"{stem}.yaml"] = sw.render_wandb(spec)
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in sw.WANDB_DIR.glob("*.yaml")}
    assert set(on_disk) == set(expected), "run: python -m hps_exp.sweep NAME --write-wandb"
    for fname, text in expected.items():
        assert on_disk[fname] == text, f"{fname} is stale: python -m hps_exp.sweep NAME --write-wandb"


def test_wandb_files_are_not_git_ignored():
    """sweeps/wandb/*.yaml must be committable (a bare `wandb/` line in .gitignore would hide them)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = sorted(str(p.relative_to(REPO)) for p in sw.WANDB_DIR.glob("*.yaml"))
    r = subprocess.run(["git", "check-ignore", "-v", *files], cwd=REPO, capture_output=True, text=True)
    assert r.stdout == "", f"git ignores W&B sweep files: {r.stdout}"


@pytest.mark.parametrize("name", SMALL)
def test_wandb_sweeps_run_the_same_jobs_and_compose(compose, name):
    s = sw.load(name)
    hydra_jobs = {frozenset(j) for arm_jobs in sw.jobs(s).values() for j in arm_jobs}
    wandb_jobs = set()
    for stem in sw.wandb_sweeps(s):
        spec = yaml.safe_load((sw.WANDB_DIR / f"{stem}.yaml").read_text(encoding="utf-8"))
        assert spec["method"] == "grid" and spec["program"] == "hps_exp"
        assert spec["command"] == ["${env}", "${interpreter}", "-m", "hps_exp", "${args_no_hyphens}"]
        for params in sw.wandb_jobs(spec):
            compose(params)  # every parameter is a config key (or group) that exists
            wandb_jobs.add(frozenset(params))
    assert wandb_jobs == hydra_jobs


def test_wandb_job_with_a_key_that_does_not_exist_fails_to_compose(compose):
    """The compose check above can fail: a misspelt key is rejected."""
    with pytest.raises(Exception, match="lose"):
        compose(["lose.beta=0.1"])


# -------------------------------------------------------------------------------------- end to end

def test_micro_sweep_end_to_end_then_tables(tmp_path):
    """Three arms through `python -m hps_exp.sweep PATH`: two tiny jobs that train, one that fails its config
    check; the runner reports the failure, exits 1, and the tables list both trained methods."""
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump({
        "description": "micro end-to-end sweep",
        "arms": {"BT": ["loss=bt"], "HPS": ["loss=hps"], "broken": ["loss=pl", "sampler=best_worst"]},
        "grid": {"seed": "0"},
        "fixed": ["dataset.n_train=12", "dataset.n_test=6", "dataset.n_responses=4", "eval.max_prompts=4",
                  "eval.max_new_tokens=6", "eval.batch_size=8", "sft.epochs=1", "trainer.epochs=1",
                  "trainer.batch_size=4", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                  "model.vocab_size=300", "trainer.device=cpu", "logger.mode=disabled",
                  f"cache_dir={tmp_path / 'cache'}"],
    }))
    jobs_dir = tmp_path / "jobs"
    # PYTHONPATH: the subprocesses run this checkout's code, not whatever hps_exp is installed in the venv.
    env = {**os.environ, "WANDB_MODE": "disabled", "HPS_EXP_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "hps_exp.sweep", str(path), "--jobs-dir", str(jobs_dir)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "summary of micro" in r.stdout and "job broken/0: failed" in r.stdout
    for arm in ("BT", "HPS"):
        metrics = json.loads((jobs_dir / arm / "0" / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["run"]["sweep"] == "micro"
    assert json.loads((jobs_dir / "broken" / "0" / "metrics.json").read_text())["status"] == "failed"

    t = subprocess.run([sys.executable, "-m", "hps_exp.tables", str(jobs_dir)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
    assert "| DPO-BT |" in t.stdout and "| DPO-HPS" in t.stdout  # full HPS: "DPO-HPS" or "DPO-HPS-full"
    assert "2 completed run(s), 1 failed or missing, out of 3 job dir(s)" in t.stdout
    assert (jobs_dir / "table.md").is_file()


def test_main_paper_evaluates_each_policy_on_both_sets():
    s = sw.load("main_paper")
    for arm_jobs in sw.jobs(s, ["dataset.path=/x.jsonl"]).values():
        for job in arm_jobs:
            assert "eval.datasets=[hh_rlhf,pku_safety]" in job
            assert not any(sw.key_of(o) == "eval.dataset" for o in job)  # no transfer axis: nothing trains twice


# ------------------------------------------------------------------------------ cluster launcher, parallel arms

def test_slurm_launcher_config_composes():
    cfg = config.compose(["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8",
                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one process per GPU: tasks follow gpus_per_node unless set; world = nodes x tasks_per_node
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.max_num_timeout >= 1
    assert str(launcher.submitit_folder).endswith("/.submitit/%j")  # hidden from the tables


def test_parallel_is_automatic_with_a_cluster_launcher(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"arms": {"A": ["seed=1"]}}))
    s = sw.load(str(path))
    assert sw.launcher_of(s) == "basic" and not sw.wants_parallel(s, [], None)
    assert sw.launcher_of(s, ["hydra/launcher=slurm"]) == "slurm"
    assert sw.wants_parallel(s, ["hydra/launcher=slurm"], None)
    assert not sw.wants_parallel(s, ["hydra/launcher=slurm"], False)
    assert sw.wants_parallel(s, [], True)
    assert not sw.wants_parallel(s, ["hydra/launcher=basic"], None)


FAKE_PYTHON = """#!{python}
# Stands in for `python -m hps_exp -m ...`: waits at a barrier until every arm has started (so it fails unless the
# arms run concurrently), then writes job 0's metrics.json like the app.
import json, os, pathlib, sys, time
args = sys.argv[1:]
assert args[:3] == ["-m", "hps_exp", "-m"], args
sweep_dir = pathlib.Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")))
arm = sweep_dir.name
barrier = pathlib.Path(os.environ["FAKE_BARRIER"])
barrier.mkdir(exist_ok=True)
(barrier / arm).touch()
deadline = time.time() + float(os.environ.get("FAKE_TIMEOUT", "60"))
while len(list(barrier.iterdir())) < int(os.environ["FAKE_ARMS"]):
    if time.time() > deadline:
        print("barrier timeout: the arms did not run at the same time")
        sys.exit(3)
    time.sleep(0.05)
(sweep_dir / "0").mkdir(parents=True, exist_ok=True)
status = "failed" if arm == "broken" else "completed"
(sweep_dir / "0" / "metrics.json").write_text(json.dumps({{"status": status}}))
print("fake multirun", " ".join(args))
sys.exit(1 if arm == "broken" else 0)
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    exe = tmp_path / "fake_python"
    exe.write_text(FAKE_PYTHON.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_BARRIER", str(tmp_path / "barrier"))
    return exe


def _three_arms(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump({"arms": {"A": ["seed=1"], "B": ["seed=2"], "broken": ["seed=3"]},
                                    "fixed": ["trainer.epochs=1"]}))
    return path


def test_arms_start_together_under_a_cluster_launcher(tmp_path, fake_python, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ARMS", "3")  # each fake waits for all three: a sequential runner would time out
    jobs_dir = tmp_path / "jobs"
    rc = sw.main([str(_three_arms(tmp_path)), "--jobs-dir", str(jobs_dir), "--python", str(fake_python),
                  "hydra/launcher=slurm"])
    out = capsys.readouterr().out
    assert rc == 1, out  # the broken arm failed; the others completed
    assert "arms run all at once" in out
    assert "job broken/0: failed" in out and "total: 3 job(s), 2 completed" in out
    for arm in ("A", "B"):
        log = (jobs_dir / ".sweep_logs" / f"{arm}.log").read_text()
        assert "fake multirun" in log and "hydra/launcher=slurm" in log and "barrier timeout" not in log
        assert f"hydra.sweep.dir={jobs_dir / arm}" in log
        assert json.loads((jobs_dir / arm / "0" / "metrics.json").read_text())["status"] == "completed"
    from hps_exp import tables

    assert sorted(p.relative_to(jobs_dir).as_posix() for p in tables.find_job_dirs(jobs_dir)) == \
        ["A/0", "B/0", "broken/0"]  # the logs dir is not a job


def test_no_parallel_runs_arms_one_after_another(tmp_path, fake_python, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ARMS", "1")
    jobs_dir = tmp_path / "jobs"
    rc = sw.main([str(_three_arms(tmp_path)), "--jobs-dir", str(jobs_dir), "--python", str(fake_python),
                  "hydra/launcher=slurm", "--no-parallel"])
    out = capsys.readouterr().out
    assert rc == 1 and "arms run one after another" in out and "=== arm B" in out
    assert not (jobs_dir / ".sweep_logs").exists()


def test_the_barrier_fails_when_an_arm_is_missing(tmp_path, fake_python, monkeypatch, capsys):
    """The concurrency check can fail: four arms expected, three started -> every arm times out."""
    monkeypatch.setenv("FAKE_ARMS", "4")
    monkeypatch.setenv("FAKE_TIMEOUT", "1")
    jobs_dir = tmp_path / "jobs"
    rc = sw.main([str(_three_arms(tmp_path)), "--jobs-dir", str(jobs_dir), "--python", str(fake_python),
                  "--parallel"])
    assert rc == 1
    assert "barrier timeout" in (jobs_dir / ".sweep_logs" / "A.log").read_text()
    assert "total: 3 job(s), 0 completed" in capsys.readouterr().out


def test_the_launched_grid_is_recorded_with_its_extras(tmp_path, fake_python, monkeypatch, capsys):
    """Issue 18.7: the runner records what it launched (extras included) before any job starts; --dry-run
    records nothing; a relaunch with another grid replaces the record and says so."""
    monkeypatch.setenv("FAKE_ARMS", "1")
    path = tmp_path / "rec.yaml"
    path.write_text(yaml.safe_dump({"arms": {"A": ["loss=bt"], "B": ["loss=pl"]}, "grid": {"seed": "0,1,2"},
                                    "fixed": ["trainer.epochs=1"], "compare": {"treatment": "PL"}}))
    jobs_dir = tmp_path / "jobs"
    assert sw.main([str(path), "--dry-run", "--jobs-dir", str(jobs_dir), "seed=0"]) == 0
    assert not (jobs_dir / sw.GRID_RECORD).exists()
    assert sw.main([str(path), "--jobs-dir", str(jobs_dir), "--python", str(fake_python), "seed=0",
                    "dataset.n_train=64"]) == 0
    out = capsys.readouterr().out
    assert f"recorded the launched grid in {jobs_dir / sw.GRID_RECORD}" in out
    record = sw.read_grid_record(jobs_dir)
    assert record["sweep"] == "rec" and record["label"] == "rec" and record["extra"] == ["seed=0", "dataset.n_train=64"]
    assert record["compare"] == {"treatment": "PL"} and record["sweep_file"] == str(path.resolve())
    assert {arm: v["jobs"] for arm, v in record["arms"].items()} == sw.jobs(sw.load(str(path)),
                                                                            ["seed=0", "dataset.n_train=64"])
    assert record["arms"]["A"]["jobs"] == [["trainer.epochs=1", "seed=0", "loss=bt", "sweep=rec",
                                            "dataset.n_train=64"]]
    assert record["arms"]["B"]["command"][-2] == f"hydra.sweep.dir={jobs_dir / 'B'}"
    # Relaunch with the yaml's own seeds: the record follows, and the change is said.
    assert sw.main([str(path), "--jobs-dir", str(jobs_dir), "--python", str(fake_python)]) == 1  # fake: job 0 only
    assert "recorded another grid (sweep rec" in capsys.readouterr().out
    assert [len(v["jobs"]) for v in sw.read_grid_record(jobs_dir)["arms"].values()] == [3, 3]
    (jobs_dir / sw.GRID_RECORD).write_text("[]")
    with pytest.raises(sw.SweepError) as e:
        sw.read_grid_record(jobs_dir)
    assert str(jobs_dir / sw.GRID_RECORD) in str(e.value)


@pytest.mark.slow
def test_a_killed_sweep_rerun_finishes_every_job_with_the_same_numbers(tmp_path):
    """Issue 16 (resume): kill the runner and its jobs mid-way (SIGKILL to its process group, after arm A's job
    finished), rerun the same command: every job completes, the summary counts the earlier one as completed, and
    arm A's numbers are the ones it had before the kill."""
    import signal
    import time

    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump({
        "description": "resume test", "arms": {"A": ["loss=bt"], "B": ["loss=hps"]}, "grid": {"seed": "0"},
        "fixed": ["dataset.n_train=12", "dataset.n_test=6", "dataset.n_responses=4", "eval.max_prompts=4",
                  "eval.max_new_tokens=6", "eval.batch_size=8", "sft.epochs=1", "trainer.epochs=2",
                  "trainer.batch_size=4", "trainer.save_every=1", "model.n_layer=1", "model.n_head=2",
                  "model.n_embd=32", "model.vocab_size=300", "trainer.device=cpu", "logger.mode=disabled",
                  "trainer.num_threads=1", f"cache_dir={tmp_path / 'cache'}"]}))
    jobs_dir = tmp_path / "jobs"
    env = {**os.environ, "WANDB_MODE": "disabled", "HPS_EXP_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "hps_exp.sweep", str(path), "--jobs-dir", str(jobs_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done_a = jobs_dir / "A" / "0" / "metrics.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and sw.job_status(done_a.parent) != "completed":
        time.sleep(0.2)
    assert sw.job_status(done_a.parent) == "completed"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its multirun (one process group, started here)
    proc.wait()
    before = json.loads(done_a.read_text())["eval"]
    assert sw.job_status(jobs_dir / "B" / "0") != "completed"  # killed before B finished
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "total: 2 job(s), 2 completed" in r.stdout
    assert json.loads(done_a.read_text())["eval"] == before
    assert json.loads((jobs_dir / "B" / "0" / "metrics.json").read_text())["status"] == "completed"
