"""hps_exp.tables on crafted sweep dirs with known numbers."""
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from hps_exp import tables
from hps_exp.tables import plots
from hps_exp.tables.collect import grids_of, missing_jobs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Reward margin on "hh" per method and seed: the cells whose mean/std the tests check by hand.
HH_MARGIN = {"DPO-HPS": [1.0, 1.5, 2.0], "DPO-BT": [0.2, 0.4], "DPO-PL": [0.5, 0.9],
             "IPO-HPS": [1.2, 1.2], "CUSTOM": [0.1]}
# Everything else: a per-method level plus a small per-seed wobble.
LEVEL = {"DPO-HPS": 3.0, "DPO-BT": 1.0, "DPO-PL": 2.0, "IPO-HPS": 4.0, "CUSTOM": 0.5}
SFT = {"bleu_corpus": 10.0, "reward": 100.0, "reward_margin": 0.0, "reward_margin_hardest": 0.0}


def write_job(job_dir, metrics=None, overrides=None):
    job_dir.mkdir(parents=True)
    if overrides is not None:
        (job_dir / ".hydra").mkdir()
        (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))


def completed(method, seed, hh_margin, level, n_responses=8, gamma=1.0, beta=0.1, pku_margin=None):
    fw, _, pm = method.partition("-")
    run = {"method": method, "framework": fw.lower(), "preference_model": pm, "train_dataset": "synthetic",
           "seed": seed, "n_responses": n_responses, "gamma": gamma, "beta": beta, "sweep": "t"}
    wobble = 0.1 * seed
    hh = {"sft": {**SFT, "harmful_rate": None},
          "aligned": {"bleu_corpus": 10 + level + wobble, "reward": level + wobble, "reward_margin": hh_margin,
                      "reward_margin_hardest": hh_margin / 2, "harmful_rate": None}}
    pku = {"sft": {**SFT, "harmful_rate": 0.5},
           "aligned": {"bleu_corpus": 20 - level + wobble, "reward": -level + wobble,
                       "reward_margin": level if pku_margin is None else pku_margin,
                       "reward_margin_hardest": 0.0, "harmful_rate": 0.5 / level}}
    return {"status": "completed", "run": run, "eval": {"hh": hh, "pku": pku}, "timing": {"total_s": 1.0}}


@pytest.fixture
def sweep(tmp_path):
    """Main sweep: 5 methods x 1-3 seeds x 2 eval sets, one failed job, one crashed job (no metrics.json)."""
    root = tmp_path / "sweep"
    num = 0
    # Written out of table order so the sort is tested.
    for method in ("IPO-HPS", "CUSTOM", "DPO-HPS", "DPO-PL", "DPO-BT"):
        for seed, margin in enumerate(HH_MARGIN[method]):
            write_job(root / str(num), completed(method, seed, margin, LEVEL[method]),
                      [f"method={method}", f"seed={seed}"])
            num += 1
    write_job(root / str(num), {"status": "failed", "error": "ConfigError: loss.beta must be > 0"},
              ["loss=hps", "loss.beta=-1"])
    write_job(root / str(num + 1), overrides=["loss=pl", "seed=7"])  # crashed before writing metrics.json
    return root


def never_started(runs, sweep_dirs, sweep_names=None):
    """(jobs of the grid that never started, notes), as the CLI finds them."""
    grids, notes = grids_of(runs, sweep_dirs, sweep_names)
    return missing_jobs(runs, grids), notes


def parse_md_table(md, title):
    """The Markdown table under the heading containing `title` -> (headers, {row label: cells})."""
    section = md.split(title, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split(" | ")]  # noqa: E731
    headers = split(lines[0])
    rows = {}
    for ln in lines[2:]:
        cells = split(ln)
        rows[cells[0]] = cells
    return headers, rows


def test_cell_mean_and_std_match_hand_computed(sweep):
    runs = tables.collect_runs([sweep])
    main = tables.main_table(runs)
    cell = main.cell("DPO-HPS", ("hh", "reward_margin"))
    assert cell.n == 3 and cell.mean == pytest.approx(1.5) and cell.std == pytest.approx(0.5)
    cell = main.cell("DPO-BT", ("hh", "reward_margin"))
    assert cell.mean == pytest.approx(0.3) and cell.std == pytest.approx(math.sqrt(0.02))
    cell = main.cell("IPO-HPS", ("hh", "reward_margin"))
    assert cell.std == pytest.approx(0.0)
    cell = main.cell("CUSTOM", ("hh", "reward_margin"))  # one seed: no std
    assert (cell.mean, cell.std, cell.n) == (pytest.approx(0.1), None, 1)
    # bleu_corpus = 10 + level + 0.1*seed over seeds 0, 1, 2
    cell = main.cell("DPO-HPS", ("hh", "bleu_corpus"))
    assert cell.mean == pytest.approx(13.1) and cell.std == pytest.approx(statistics.stdev([13.0, 13.1, 13.2]))


def test_summarize_uses_sample_std_and_skips_nulls():
    cell = tables.summarize([1.0, None, 2.0, 6.0])
    assert (cell.mean, cell.n) == (3.0, 3) and cell.std == pytest.approx(math.sqrt(7.0))
    assert tables.summarize([None, None]) is None
    assert tables.summarize([4.0]).std is None


def test_markdown_rows_cells_and_bold(sweep, capsys):
    assert tables.main([str(sweep)]) == 0
    md = (sweep / "table.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()  # stdout is the Markdown
    headers, rows = parse_md_table(md, "## Main results")
    assert list(rows) == ["SFT (reference)", "DPO-BT", "DPO-PL", "DPO-HPS", "IPO-HPS", "CUSTOM"]
    assert headers[:2] == ["Method", "n"]
    # Harmful rate only where an eval set has labels (pku), marked as lower-is-better.
    assert "pku · Harmful rate ↓" in headers and "hh · Harmful rate ↓" not in headers
    col = headers.index("hh · Reward margin ↑")
    # Seeds-only bootstrap (†): P(all three draws = 1.0) = 1/27 > 2.5 %, so the interval ends are 1.0 and 2.0.
    assert rows["DPO-HPS"][col] == "**1.50 [1.00, 2.00]†**"
    assert rows["DPO-BT"][col] == "0.30 [0.20, 0.40]†"
    assert rows["CUSTOM"][col] == "0.10 [0.10, 0.10]†"  # one seed: the interval collapses
    assert [rows[r][1] for r in rows] == ["3", "2", "2", "3", "2", "1"]  # SFT n = distinct seeds
    # Exactly one bold cell per column, in the expected row; SFT (reward 100) is never ranked.
    expected_best = {"hh · BLEU ↑": "IPO-HPS", "hh · Reward ↑": "IPO-HPS", "hh · Reward margin ↑": "DPO-HPS",
                     "pku · BLEU ↑": "CUSTOM", "pku · Reward ↑": "CUSTOM", "pku · Reward margin ↑": "IPO-HPS",
                     "pku · Harmful rate ↓": "IPO-HPS"}
    assert set(expected_best) == set(headers[2:])
    for header, best in expected_best.items():
        i = headers.index(header)
        bold = [r for r, cells in rows.items() if cells[i].startswith("**")]
        assert bold == [best], header
    assert not any(c.startswith("**") for c in rows["SFT (reference)"])
    assert rows["SFT (reference)"][headers.index("hh · Reward ↑")] == "100.00 [100.00, 100.00]†"  # all seeds
    assert "python -m hps_exp.tables " + str(sweep) in md


def test_ties_are_all_bold(tmp_path):
    root = tmp_path / "tie"
    write_job(root / "0", completed("DPO-BT", 0, 2.0, 1.0))
    write_job(root / "1", completed("DPO-HPS", 0, 2.0, 3.0))
    write_job(root / "2", completed("DPO-PL", 0, 1.0, 2.0))
    main = tables.main_table(tables.collect_runs([root]))
    assert tables.best_rows(main, ("hh", "reward_margin"), 2) == {"DPO-BT", "DPO-HPS"}
    assert tables.best_rows(main, ("pku", "harmful_rate"), 2) == {"DPO-HPS"}  # lowest wins for ↓


def test_failed_and_missing_runs_are_listed(sweep):
    runs = tables.collect_runs([sweep])
    statuses = {r.job_dir.name: r.status for r in runs}
    assert len(runs) == 12 and statuses["10"] == "failed" and statuses["11"] == "missing"
    assert tables.main([str(sweep)]) == 0
    md = (sweep / "table.md").read_text()
    failed = md.split("## Failed or missing runs", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in failed.splitlines() if ln.startswith("| ") and str(sweep) in ln]
    assert len(rows) == 2
    failed_row = next(ln for ln in rows if f"{sweep / '10'} |" in ln)
    assert "failed" in failed_row and "ConfigError: loss.beta must be > 0" in failed_row
    assert "`loss=hps`" in failed_row and "`loss.beta=-1`" in failed_row
    missing_row = next(ln for ln in rows if f"{sweep / '11'} |" in ln)
    assert "missing" in missing_row and "`loss=pl`" in missing_row and "`seed=7`" in missing_row
    assert "no metrics.json" in missing_row
    assert "10 completed run(s), 2 failed or missing, out of 12 job dir(s)" in md


def test_csv_is_long_format(sweep):
    assert tables.main([str(sweep)]) == 0
    with open(sweep / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "eval_set", "metric", "mean", "lo", "hi", "interval", "std", "n_seeds"]
    # 6 rows (SFT + 5 methods) x (hh: 3 metrics + pku: 4 with the harmful rate) + timing (total_s) of 5 methods.
    assert len(rows) == 6 * 7 + 5
    assert {(r["eval_set"], r["metric"]) for r in rows[-5:]} == {("timing", "total_s")}
    rows = rows[:-5]
    by_key = {(r["method"], r["eval_set"], r["metric"]): r for r in rows}
    r = by_key[("DPO-HPS", "hh", "reward_margin")]
    assert float(r["mean"]) == pytest.approx(1.5) and float(r["std"]) == pytest.approx(0.5)
    assert (float(r["lo"]), float(r["hi"]), r["interval"], r["n_seeds"]) == (1.0, 2.0, "seeds", "3")
    r = by_key[("CUSTOM", "pku", "harmful_rate")]
    assert float(r["mean"]) == pytest.approx(1.0) and r["std"] == "" and r["n_seeds"] == "1"
    assert float(by_key[("SFT (reference)", "pku", "harmful_rate")]["mean"]) == pytest.approx(0.5)
    assert ("DPO-HPS", "hh", "harmful_rate") not in by_key
    assert [r["method"] for r in rows][::7] == ["SFT (reference)", "DPO-BT", "DPO-PL", "DPO-HPS", "IPO-HPS",
                                                "CUSTOM"]


def test_margin_metric_option(sweep, tmp_path):
    out = tmp_path / "out"
    assert tables.main([str(sweep), "--out", str(out), "--metric-margin", "reward_margin_hardest"]) == 0
    assert not (sweep / "table.md").exists()
    headers, rows = parse_md_table((out / "table.md").read_text(), "## Main results")
    assert rows["DPO-HPS"][headers.index("hh · Reward margin (hardest) ↑")] == "**0.75 [0.50, 1.00]†**"


def test_rows_follow_the_papers_order_not_names(tmp_path):
    """Rows sort by framework, then preference model, in the paper's order (the tables' ROW_ORDER, not the
    method names); a framework or preference model it does not list comes after, alphabetically."""
    root = tmp_path / "order"
    methods = ["Zeta-A", "IPO-BT", "DPO-Hinge", "Alpha-B", "DPO-HPS", "DPO-PL", "SPPO-DPO"]
    for i, method in enumerate(methods):
        write_job(root / str(i), completed(method, 0, 1.0, 1.0))
    main = tables.main_table(tables.collect_runs([root]), n_boot=50)
    assert main.rows[1:] == ["DPO-PL", "DPO-HPS", "DPO-Hinge", "IPO-BT", "SPPO-DPO", "Alpha-B", "Zeta-A"]


@pytest.fixture
def n_sweep(tmp_path):
    """DPO-HPS and DPO-PL over n_responses in {2, 4, 8} x 2 seeds; margin = n/10 + method offset + 0.02*seed."""
    root = tmp_path / "n_sweep"
    num = 0
    for method, offset in (("DPO-PL", 0.0), ("DPO-HPS", 1.0)):
        for n in (8, 2, 4):
            for seed in (0, 1):
                write_job(root / str(num), completed(method, seed, n / 10 + offset + 0.02 * seed, 1.0,
                                                     n_responses=n), [f"n={n}"])
                num += 1
    write_job(root / str(num), completed("DPO-BT", 0, 0.3, 1.0, n_responses=2))  # only one n: not ablated
    return root


def test_ablation_table_over_n_responses(n_sweep):
    runs = tables.collect_runs([n_sweep])
    abl = tables.ablation_table(runs, "n_responses")
    assert abl.rows == ["DPO-PL", "DPO-HPS"]
    assert abl.columns[:3] == [("hh", 2), ("hh", 4), ("hh", 8)]
    for method, offset in (("DPO-PL", 0.0), ("DPO-HPS", 1.0)):
        for n in (2, 4, 8):
            cell = abl.cell(method, ("hh", n))
            assert cell.n == 2 and cell.mean == pytest.approx(n / 10 + offset + 0.01)
            assert cell.std == pytest.approx(statistics.stdev([0.0, 0.02]))
    assert tables.ablation_table(runs, "gamma") is None  # gamma never varies here
    # The main table keeps different n apart instead of averaging them.
    main = tables.main_table(runs)
    assert [r for r in main.rows if r.startswith("DPO-HPS")] == [
        "DPO-HPS (n_resp=2)", "DPO-HPS (n_resp=4)", "DPO-HPS (n_resp=8)"]
    assert "DPO-BT" in main.rows


def test_ablation_over_gamma_keeps_beta_apart(tmp_path):
    root = tmp_path / "grid"
    num = 0
    for gamma in (0.5, 1.0, "linear(0->1)"):
        for beta in (0.1, 0.5):
            write_job(root / str(num), completed("DPO-HPS", 0, beta * 10 + (gamma if gamma != "linear(0->1)" else 9),
                                                 1.0, gamma=gamma, beta=beta))
            num += 1
    abl = tables.ablation_table(tables.collect_runs([root]), "gamma")
    assert abl.rows == ["DPO-HPS (β=0.1)", "DPO-HPS (β=0.5)"]
    assert [v for e, v in abl.columns if e == "hh"] == [0.5, 1.0, "linear(0->1)"]
    assert abl.cell("DPO-HPS (β=0.5)", ("hh", 1.0)).mean == pytest.approx(6.0)
    assert abl.cell("DPO-HPS (β=0.1)", ("hh", "linear(0->1)")).mean == pytest.approx(10.0)


def _with_config(metrics, **config):
    return {**metrics, "identity": {"config": {"seed": 0, "loss.beta": metrics["run"]["beta"], **config}}}


def test_runs_with_other_hyperparameters_are_never_averaged_into_one_row(tmp_path):
    """A tuning grid: lr is no run setting, but the run's config (identity.config) says it differs; the seed and
    the thread count (no result changes with it) do not split a row."""
    root = tmp_path / "grid"
    for i, (lr, seed, threads, margin) in enumerate([(1e-4, 0, 1, 1.0), (4e-4, 0, 1, 3.0), (4e-4, 1, 2, 5.0)]):
        config = {"trainer.lr": lr, "trainer.seed": seed, "trainer.num_threads": threads}
        write_job(root / str(i), _with_config(completed("DPO-HPS", seed, margin, 1.0), **config))
    main = tables.main_table(tables.collect_runs([root]))
    assert [r for r in main.rows if r not in main.reference_rows] == ["DPO-HPS (lr=0.0001)", "DPO-HPS (lr=0.0004)"]
    assert main.n["DPO-HPS (lr=0.0004)"] == 2
    assert main.cell("DPO-HPS (lr=0.0004)", ("hh", "reward_margin")).mean == pytest.approx(4.0)


def test_an_ablations_own_key_does_not_split_its_rows_under_its_config_name(tmp_path):
    root = tmp_path / "grid"
    for i, beta in enumerate((0.1, 0.5)):
        write_job(root / str(i), _with_config(completed("DPO-HPS", 0, beta * 10, 1.0, beta=beta)))
    abl = tables.ablation_table(tables.collect_runs([root]), "beta")
    assert abl.rows == ["DPO-HPS"] and [v for e, v in abl.columns if e == "hh"] == [0.1, 0.5]


def test_ablation_section_and_plots(n_sweep, capsys):
    pytest.importorskip("matplotlib")
    assert tables.main([str(n_sweep)]) == 0
    md = (n_sweep / "table.md").read_text()
    headers, rows = parse_md_table(md, "## Ablation: Reward margin vs n_resp")
    assert headers[2:5] == ["hh · n_resp=2", "hh · n_resp=4", "hh · n_resp=8"]
    assert rows["DPO-HPS"][2:5] == ["1.21 [1.20, 1.22]†", "1.41 [1.40, 1.42]†", "1.81 [1.80, 1.82]†"]
    for name in ("reward_margin.png", "vs_n_responses.png"):
        assert (n_sweep / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not (n_sweep / "vs_gamma.png").exists()


def test_gamma_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "g"
    for i, gamma in enumerate((0.5, 1.0, 0.5, 1.0)):
        write_job(root / str(i), completed("DPO-HPS", i // 2, gamma, 1.0, gamma=gamma))
    assert tables.main([str(root), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "vs_gamma.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "o" / "reward_margin.png").read_bytes()[:8] == PNG_MAGIC


def test_tables_work_without_matplotlib(sweep, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert tables.main([str(sweep)]) == 0
    assert (sweep / "table.md").exists() and (sweep / "table.csv").exists()
    assert not (sweep / "reward_margin.png").exists()
    assert "matplotlib" in capsys.readouterr().err


def test_exit_codes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tables.main([str(empty)]) == 1
    assert str(empty) in capsys.readouterr().err
    assert not (empty / "table.md").exists()
    assert tables.main([str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
    only_failed = tmp_path / "only_failed"
    write_job(only_failed / "0", {"status": "failed", "error": "RuntimeError: boom"}, ["seed=1"])
    assert tables.main([str(only_failed)]) == 1
    err = capsys.readouterr().err
    assert str(only_failed) in err and "RuntimeError: boom" in err


def test_cli_module_entry_point(sweep):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "hps_exp.tables", str(sweep), "--out", str(sweep / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| DPO-HPS | 3 |" in proc.stdout
    assert (sweep / "o" / "table.csv").exists()


def test_job_dir_discovery_depth(tmp_path):
    root = tmp_path / "root"
    write_job(root / "a" / "b" / "c", completed("DPO-BT", 0, 1.0, 1.0))       # depth 3: found
    write_job(root / "a" / "b" / "c" / "d", completed("DPO-PL", 0, 1.0, 1.0))  # inside a job dir: not a job
    write_job(root / "w" / "x" / "y" / "z", completed("DPO-HPS", 0, 1.0, 1.0))  # depth 4: too deep
    write_job(root / "h", overrides=["seed=0"])                                 # .hydra only: a (missing) job
    write_job(root / ".cache" / "j", completed("DPO-BT", 0, 1.0, 1.0))         # hidden dirs are not searched
    found = tables.find_job_dirs(root)
    assert found == [root / "a" / "b" / "c", root / "h"]
    # A single run dir works as the argument too.
    assert tables.find_job_dirs(root / "a" / "b" / "c") == [root / "a" / "b" / "c"]


def test_unreadable_metrics_are_listed(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "0").mkdir()
    (root / "0" / "metrics.json").write_text("{not json")
    write_job(root / "1", {"status": "completed"})
    runs = tables.collect_runs([root])
    assert [r.status for r in runs] == ["unreadable", "unreadable"]
    text = tables.render_failed(runs)
    assert "metrics.json" in text and "run.method" in text


# ------------------------------------------------------------------ intervals, paired tests, timing, grid

N_PROMPTS = 20


def with_prompts(method, seed, margins, timing=None):
    """A completed run whose hh margin has per-prompt values (the scalar is their mean, as the app writes it)."""
    fw, _, pm = method.partition("-")
    m = completed(method, seed, statistics.fmean(margins), 1.0)
    hh = m["eval"]["hh"]
    hh["per_prompt"] = {"aligned": {"reward_margin": list(margins), "reward_margin_hardest": [x / 2 for x in margins]},
                        "sft": {"reward_margin": [0.0] * len(margins)}}
    hh["aligned"]["reward_margin_hardest"] = statistics.fmean(margins) / 2
    if timing is not None:
        m["timing"] = timing
    return m


@pytest.fixture
def paired_sweep(tmp_path):
    """dpo: HPS = base + 1, PL = base + 0.5 (best baseline), BT = base + 0.2 -> HPS clearly better.
    ipo: HPS = BT (best baseline) +/- 0.1 alternating -> mean difference exactly 0. 5 seeds x 20 prompts."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "paired"
    num = 0
    pm_rank = {"BT": 0, "PL": 1, "HPS": 2}
    for seed in range(5):
        base = rng.normal(0.0, 1.0, N_PROMPTS)
        wiggle = 0.1 * (-1.0) ** np.arange(N_PROMPTS)
        margins = {"DPO-HPS": base + 1.0 + rng.normal(0, 0.3, N_PROMPTS), "DPO-PL": base + 0.5,
                   "DPO-BT": base + 0.2, "IPO-HPS": base + wiggle, "IPO-BT": base, "IPO-PL": base - 1.0}
        for method, values in margins.items():
            pm = method.partition("-")[2]
            timing = {"pref_s": 10.0 * (pm_rank[pm] + 1) + seed, "pref_step_s": 0.1 * (pm_rank[pm] + 1),
                      "total_s": 100.0}
            write_job(root / str(num), with_prompts(method, seed, values.tolist(), timing))
            num += 1
    return root


def test_cells_use_per_prompt_bootstrap_when_available(paired_sweep):
    from hps_exp import stats

    runs = tables.collect_runs([paired_sweep])
    main = tables.main_table(runs, n_boot=500)
    cell = main.cell("DPO-HPS", ("hh", "reward_margin"))
    lists = [r.eval["hh"]["per_prompt"]["aligned"]["reward_margin"]
             for r in sorted(runs, key=lambda r: r.run["seed"]) if r.method == "DPO-HPS"]
    mean, lo, hi = stats.bootstrap_ci(lists, n_boot=500)
    assert cell.per_prompt and (cell.mean, cell.lo, cell.hi) == (pytest.approx(mean), lo, hi)
    assert lo < mean < hi
    assert not main.cell("DPO-HPS", ("hh", "bleu_corpus")).per_prompt  # no per-prompt BLEU: over seeds


def test_win_rate_reads_its_per_prompt_list_named_win(tmp_path):
    root = tmp_path / "win"
    for seed, wins in enumerate(([1, 0.5, 0, 1], [1, 1, 0, 0.5])):
        m = completed("DPO-HPS", seed, 1.0, 1.0)
        m["eval"]["hh"]["aligned"]["win_rate"] = sum(wins) / 4
        m["eval"]["hh"]["per_prompt"] = {"aligned": {"win": wins}}
        write_job(root / str(seed), m)
    runs = tables.collect_runs([root])
    assert tables.per_prompt_of(runs[0], "hh", "aligned", "win_rate") == [1, 0.5, 0, 1]
    main = tables.main_table(runs, n_boot=200)
    assert ("hh", "win_rate") in main.columns and "hh · Win rate vs SFT ↑" in main.headers
    cell = main.cell("DPO-HPS", ("hh", "win_rate"))
    assert cell.per_prompt and cell.mean == pytest.approx(0.625) and cell.lo < 0.625 < cell.hi


def test_per_prompt_values_that_do_not_reproduce_the_scalar_are_ignored(paired_sweep):
    path = paired_sweep / "0" / "metrics.json"
    m = json.loads(path.read_text())
    m["eval"]["hh"]["per_prompt"]["aligned"]["reward_margin"][0] += 5.0  # mean no longer equals the scalar
    path.write_text(json.dumps(m))
    runs = tables.collect_runs([paired_sweep])
    assert tables.per_prompt_of(runs[0], "hh", "aligned", "reward_margin") is None
    assert tables.per_prompt_of(runs[1], "hh", "aligned", "reward_margin") is not None
    main = tables.main_table(runs, n_boot=200)
    assert not main.cell(runs[0].method, ("hh", "reward_margin")).per_prompt  # one seed lacks them: over seeds
    assert main.cell("IPO-HPS", ("hh", "reward_margin")).per_prompt


def test_paired_test_against_the_best_baseline(paired_sweep):
    runs = tables.collect_runs([paired_sweep])
    results = {(r.metric, r.treatment): r for r in tables.paired_tests(runs, "HPS") if r.eval_set == "hh"}
    dpo = results[("reward_margin", "DPO-HPS")]
    assert dpo.baseline == "DPO-PL" and dpo.per_prompt and dpo.n_pairs == 5 * N_PROMPTS and dpo.n_seeds == 5
    assert dpo.diff == pytest.approx(0.5, abs=0.15) and dpo.p < 0.05
    ipo = results[("reward_margin", "IPO-HPS")]
    assert ipo.baseline == "IPO-BT" and ipo.diff == pytest.approx(0.0, abs=1e-12) and ipo.p > 0.5
    assert results[("reward_margin_hardest", "DPO-HPS")].p < 0.05
    # Another treatment: PL against the best of BT/HPS in its framework.
    only_bt = [r for r in tables.paired_tests(runs, "HPS", baselines=["BT"]) if r.eval_set == "hh"]
    assert {r.baseline for r in only_bt} == {"DPO-BT", "IPO-BT"}  # the sweep's baselines restrict the choice
    pl = {r.treatment: r for r in tables.paired_tests(runs, "PL")
          if r.metric == "reward_margin" and r.eval_set == "hh"}
    assert pl["DPO-PL"].baseline == "DPO-HPS" and pl["DPO-PL"].diff < 0
    assert pl["IPO-PL"].diff == pytest.approx(-1.0)  # IPO-BT and IPO-HPS tie at 1 above IPO-PL


def test_a_named_recipe_is_no_baseline(paired_sweep):
    """The authors' released recipe (label=DPO-HPS(released)) trains the DPO loss on hard-sampled pairs, so its
    preference model is "DPO": with --baselines DPO,BT,PL it must not become HPS's "best baseline"."""
    for k, seed in enumerate(range(5)):
        src = json.loads((paired_sweep / str(6 * seed + 1) / "metrics.json").read_text())   # a DPO-PL job
        assert src["run"]["method"] == "DPO-PL"
        src["run"].update(method="DPO-HPS(released)", preference_model="DPO")
        src["eval"]["hh"]["per_prompt"]["aligned"]["reward_margin"] = [
            v + 5.0 for v in src["eval"]["hh"]["per_prompt"]["aligned"]["reward_margin"]]
        src["eval"]["hh"]["aligned"]["reward_margin"] += 5.0
        src["identity"] = {"config": {"label": "DPO-HPS(released)"}}
        write_job(paired_sweep / f"released{k}", src)
    runs = tables.collect_runs([paired_sweep])
    assert "DPO-HPS(released)" in {r.label for r in tables.build_rows([r for r in runs if r.ok])}
    dpo = [r for r in tables.paired_tests(runs, "HPS", baselines=["DPO", "BT", "PL"])
           if r.eval_set == "hh" and r.metric == "reward_margin" and r.treatment == "DPO-HPS"]
    assert [r.baseline for r in dpo] == ["DPO-PL"]


def test_treatment_from_sweep_yaml_or_flag(paired_sweep, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml_text({"arms": {"A": ["trainer.lr=0.1"]},
                               "compare": {"treatment": "HPS", "baselines": ["BT", "PL"]}}))
    assert tables.main([str(paired_sweep), "--sweep", str(grid), "--n-boot", "100"]) == 0
    md = (paired_sweep / "table.md").read_text()
    section = md.split("## Paired tests", 1)[1].split("\n## ", 1)[0]
    headers, rows = parse_md_table(md, "## Paired tests")
    assert headers[-1] == "treatment better at p < 0.05"
    lines = [ln for ln in section.splitlines() if ln.startswith("| hh |")]
    assert len(lines) == 4  # 2 frameworks x 2 margins
    dpo = next(ln for ln in lines if "| Reward margin | DPO-HPS | DPO-PL |" in ln)
    ipo = next(ln for ln in lines if "| Reward margin | IPO-HPS | IPO-BT |" in ln)
    assert dpo.endswith("| yes |") and ipo.endswith("| 1.000 | equal |")
    assert tables.main([str(paired_sweep), "--compare", "PL", "--out", str(tmp_path / "o"), "--n-boot", "100"]) == 0
    assert "| Reward margin | DPO-PL | DPO-HPS |" in (tmp_path / "o" / "table.md").read_text()
    assert tables.main([str(paired_sweep), "--out", str(tmp_path / "n"), "--n-boot", "100"]) == 0
    assert "No treatment named" in (tmp_path / "n" / "table.md").read_text()
    assert tables.main([str(paired_sweep), "--sweep", str(grid), "--baselines", "BT", "--out", str(tmp_path / "b"),
                        "--n-boot", "100"]) == 0
    assert "| Reward margin | DPO-HPS | DPO-BT |" in (tmp_path / "b" / "table.md").read_text()


def yaml_text(data):
    import yaml

    return yaml.safe_dump(data)


def test_timing_table(paired_sweep):
    timing = tables.timing_table(tables.collect_runs([paired_sweep]), n_boot=200)
    assert timing.headers == ["Preference stage (s) ↓", "Per preference step (s) ↓", "Whole job (s) ↓"]
    cell = timing.cell("DPO-HPS", ("timing", "pref_s"))
    assert cell.mean == pytest.approx(30.0 + 2.0) and cell.n == 5 and not cell.per_prompt  # 30 + mean seed
    assert (cell.lo, cell.hi) != (cell.mean, cell.mean)
    assert timing.cell("IPO-BT", ("timing", "pref_step_s")).mean == pytest.approx(0.1)
    runs = tables.collect_runs([paired_sweep])
    for r in runs:  # newer runs also record their throughput: a column of its own, higher is better
        r.timing["pref_tokens_per_s"] = 100.0 + (r.run.get("seed") or 0)
    timing = tables.timing_table(runs, n_boot=200)
    assert timing.headers[2] == "Preference tokens/s ↑" and timing.headers[-1] == "Whole job (s) ↓"
    assert timing.cell("DPO-HPS", ("timing", "pref_tokens_per_s")).mean == pytest.approx(102.0)


def test_never_started_jobs_are_listed(tmp_path):
    from hps_exp import sweep as sw

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml_text({"arms": {"A": ["trainer.lr=0.1"], "B": ["trainer.lr=0.2"]}, "grid": {"seed": "0,1"}}))
    jobs = sw.jobs(sw.load(str(grid)))
    root = tmp_path / "jobs"
    write_job(root / "A" / "0", completed("DPO-BT", 0, 1.0, 1.0), jobs["A"][0])
    write_job(root / "A" / "1", overrides=["seed=5"])                       # started (by its place), crashed
    write_job(root / "elsewhere", completed("DPO-BT", 0, 1.0, 1.0), jobs["B"][0] + ["dataset.path=x"])
    runs = tables.collect_runs([root])
    missing, notes = never_started(runs, [root], [str(grid)])
    assert notes == [] and [(m.arm, m.number) for m in missing] == [("B", 1)]
    assert missing[0].overrides == jobs["B"][1]
    assert tables.main([str(root), "--sweep", str(grid), "--n-boot", "50"]) == 0
    md = (root / "table.md").read_text()
    assert "1 job(s) of the grid never started" in md
    section = md.split("## Jobs of the grid that never started", 1)[1].split("\n## ", 1)[0]
    assert f"| {grid} | B | 1 |" in section and "`trainer.lr=0.2`" in section and "`seed=1`" in section
    # A sweep name with no yaml: said, not fatal.
    missing, notes = never_started(runs, [root], ["no_such_sweep_xyz"])
    assert missing == [] and "no_such_sweep_xyz" in notes[0]


def test_never_started_listed_even_without_completed_runs(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml_text({"arms": {"A": ["trainer.lr=0.1"]}, "grid": {"seed": "0,1"}}))
    empty = tmp_path / "jobs"
    empty.mkdir()
    assert tables.main([str(empty), "--sweep", str(grid)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and f"| {grid} | A | 0 |" in err and f"| {grid} | A | 1 |" in err


def test_series_colours_never_collide():
    runs = []
    models = ["HPS", "BT", "DPO"] + [f"P{i:02d}" for i in range(12)]  # more series than palette colours
    for i, pm in enumerate(models):
        runs.append(tables.Run(Path(f"/x/{i}"), "completed", {"method": f"F{i % 3}-{pm}", "framework": f"f{i % 3}",
                                                              "preference_model": pm}))
    runs.append(tables.Run(Path("/x/y"), "completed", {"method": "F1-HPS", "framework": "f1",
                                                       "preference_model": "HPS"}))
    rows = tables.build_rows(runs)
    styles = tables.series_styles(rows)
    assert len(styles) == 15 and len(set(styles.values())) == 15
    assert list(styles)[:4] == ["DPO", "BT", "HPS", "P00"]  # in preference-model rank, then by name
    by_label = {row.label: styles[row.series] for row in rows}
    assert by_label["F0-HPS"] == by_label["F1-HPS"]  # same preference model, same colour in every framework


def test_the_released_recipe_is_its_own_series_not_dpo():
    """Its preference model is DPO (plain DPO on hard-sampled pairs): the figure had labelled its bar "DPO"."""
    runs = [tables.Run(Path(f"/x/{m}"), "completed", {"method": m, "framework": "dpo", "preference_model": pm})
            for m, pm in (("DPO", "DPO"), ("DPO-HPS(released)", "DPO"), ("DPO-BT", "BT"))]
    assert sorted(row.series for row in tables.build_rows(runs)) == ["BT", "DPO", "HPS(released)"]


def test_main_plot_panels(paired_sweep, tmp_path):
    """Issue 16: both margins in the default figure, one panel row per (framework, eval set), value labels
    above every error bar of their panel."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = tables.main_table(tables.collect_runs([paired_sweep]), margin=tables.MARGINS, n_boot=100)
    captured = {}
    real_close = plt.close

    def keep(fig):  # look at the figure before it is closed
        captured["fig"] = fig
    plt.close = keep
    try:
        tables.plot_main(plt, main, ["reward_margin", "reward_margin_hardest"], tmp_path / "m.png")
    finally:
        plt.close = real_close
    fig = captured["fig"]
    assert len(fig.axes) == 4 * 4  # (dpo, ipo) x (hh, pku) rows, 4 metric columns
    assert [ax.get_title() for ax in fig.axes[:4]] == ["BLEU", "Reward", "Reward margin", "Reward margin (hardest)"]
    assert [fig.axes[4 * i].get_ylabel() for i in range(4)] == ["DPO · hh", "DPO · pku", "IPO · hh", "IPO · pku"]
    hardest_ax = fig.axes[3]  # DPO · hh · hardest margin
    labels = [t.get_text() for t in hardest_ax.texts]
    hps = main.cell("DPO-HPS", ("hh", "reward_margin_hardest"))
    assert f"{hps.mean:.2f}" in labels and len(labels) == 3  # one value label per bar (BT, PL, HPS)
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["BT", "PL", "HPS"]  # bottom row
    colours = {tuple(p.get_facecolor()) for p in hardest_ax.patches}
    assert len(colours) == 3  # one colour per preference model
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        bar_tops = [seg[:, 1].max() for coll in ax.collections for seg in
                    (ax.transData.transform(p) for p in coll.get_segments())]  # error bars, in pixels
        assert bar_tops and ax.texts
        for text in ax.texts:
            assert text.get_window_extent(renderer).y0 > max(bar_tops), (ax.get_title(), text.get_text())
    real_close(fig)
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC


def test_default_figure_carries_both_margins(paired_sweep, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    seen = {}
    monkeypatch.setattr(plots, "plot_main", lambda plt, table, margins, path: seen.update(
        margins=list(margins), columns={m for _, m in table.columns}))
    assert tables.main([str(paired_sweep), "--out", str(tmp_path / "o"), "--n-boot", "50"]) == 0
    assert seen["margins"] == ["reward_margin", "reward_margin_hardest"]
    assert {"reward_margin", "reward_margin_hardest"} <= seen["columns"]
    headers, _ = parse_md_table((tmp_path / "o" / "table.md").read_text(), "## Main results")
    assert "hh · Reward margin (hardest) ↑" not in headers  # the table keeps the one margin asked for


def test_sft_reference_rows_split_by_the_number_of_responses(tmp_path):
    """n changes the SFT data, so an n-ablation has one SFT row per n (not one row mixing four SFT policies)."""
    from hps_exp import tables

    root = tmp_path / "nabl"
    for num, (n, seed) in enumerate((n, s) for n in (2, 8) for s in (0, 1)):
        m = completed("DPO-HPS", seed, 1.0, 1.0, n_responses=n)
        m["eval"]["hh"]["sft"] = {**m["eval"]["hh"]["sft"], "bleu_corpus": float(n)}
        write_job(root / str(num), m, [f"n={n}", f"seed={seed}"])
    table = tables.main_table(tables.collect_runs([root]))
    sft = {label: table.cell(label, ("hh", "bleu_corpus")).mean for label in table.rows if label.startswith("SFT")}
    assert sft == {"SFT (reference, n_resp=2)": 2.0, "SFT (reference, n_resp=8)": 8.0}


@pytest.mark.parametrize("shared", [True, False])
def test_sft_rows_of_one_sft_evaluation_are_one_row(tmp_path, shared):
    """A dataset-pair arm (n = 2) beside augmented arms (n = 6) re-reports the same SFT evaluation (the same
    sft_eval stage key per seed): one SFT row, not two identical ones. Different keys (another SFT policy) split."""
    from hps_exp import tables

    root = tmp_path / "mixed"
    for num, (method, n, seed) in enumerate((m, n, s) for m, n in (("DPO-DPO", 2), ("DPO-HPS", 6)) for s in (0, 1)):
        m = completed(method, seed, 1.0, 1.0, n_responses=n)
        m["eval"]["hh"]["sft"] = {**m["eval"]["hh"]["sft"], "bleu_corpus": 5.0 if shared else float(n)}
        m["identity"] = {"stages": [["sft", f"s{seed}"], ["sft_eval", f"e{seed}" if shared else f"e{seed}n{n}"]]}
        write_job(root / str(num), m, [f"method={method}", f"seed={seed}"])
    table = tables.main_table(tables.collect_runs([root]))
    sft = {label: (table.cell(label, ("hh", "bleu_corpus")).mean, table.n[label])
           for label in table.rows if label.startswith("SFT")}
    assert sft == ({"SFT (reference)": (5.0, 2)} if shared else
                   {"SFT (reference, n_resp=2)": (2.0, 2), "SFT (reference, n_resp=6)": (6.0, 2)})


def _launch_record(jobs_dir, name, extra):
    """What `python -m hps_exp.sweep NAME extra...` records when it starts (hps_exp.sweep.run)."""
    from hps_exp import sweep as sw

    s = sw.load(name)
    all_jobs = sw.jobs(s, extra)
    commands = {arm: sw.command(s, arm, jobs_dir, extra) for arm in all_jobs}
    sw.write_grid_record(jobs_dir, sw.grid_record(s, extra, all_jobs, commands), out=sys.stdout)
    return all_jobs


def test_never_started_compares_against_the_recorded_grid(tmp_path, capsys):
    """Issue 18.7: a sweep launched with `seed=0 dataset.n_train=64` over main_dpo_small lists no job of the
    yaml's seeds 1-4 as never started; the grid that ran is the one recorded at launch."""
    jobs_dir = tmp_path / "main_dpo_small"
    launched = _launch_record(jobs_dir, "main_dpo_small", ["seed=0", "dataset.n_train=64"])
    assert {arm: len(j) for arm, j in launched.items()} == {"DPO-BT": 1, "DPO-PL": 1, "DPO-HPS": 1, "DPO-HPS-full": 1}
    for _, arm in enumerate(launched):
        m = completed(arm, 0, 1.0, 1.0)
        m["run"]["sweep"] = "main_dpo_small"
        write_job(jobs_dir / arm / "0", m, launched[arm][0])
    runs = tables.collect_runs([jobs_dir])
    missing, notes = never_started(runs, [jobs_dir])
    assert missing == [] and notes == []
    assert tables.main([str(jobs_dir), "--n-boot", "50"]) == 0
    md = (jobs_dir / "table.md").read_text()
    assert "0 job(s) of the grid never started" in md
    assert "every job of the grid (main_dpo_small, recorded at launch) has a job dir" in md
    # The recorded grid's compare (from the yaml at launch) names the paired test's treatment.
    assert "| Reward margin | DPO-HPS | " in md
    # One arm's job dir lost: exactly that job is listed, with the overrides it was launched with.
    import shutil

    shutil.rmtree(jobs_dir / "DPO-PL" / "0")
    missing, _ = never_started(tables.collect_runs([jobs_dir]), [jobs_dir])
    assert [(m.arm, m.number) for m in missing] == [("DPO-PL", 0)]
    assert "dataset.n_train=64" in missing[0].overrides and "seed=0" in missing[0].overrides
    # Without the record, the yaml's grid is the fallback, and the tables say so.
    (jobs_dir / "sweep_grid.json").unlink()
    missing, notes = never_started(tables.collect_runs([jobs_dir]), [jobs_dir])
    assert len(missing) == 1 + 4 * 4  # the lost job and seeds 1-4 of every arm, as the yaml has them
    assert len(notes) == 1 and "no grid recorded at launch" in notes[0] and "main_dpo_small.yaml" in notes[0]


def test_one_sweep_launched_per_seed_dir_is_named_once(tmp_path):
    """The SmolLM2 loop launches one sweep per seed into its own dir: the tables name that grid once, with the
    number of dirs, not once per dir."""
    dirs = [tmp_path / f"seed{s}" for s in (0, 1)]
    for s, jobs_dir in enumerate(dirs):
        launched = _launch_record(jobs_dir, "main_dpo_small", [f"seed={s}", "dataset.n_train=64"])
        for arm in launched:
            m = completed(arm, s, 1.0, 1.0)
            m["run"]["sweep"] = "main_dpo_small"
            write_job(jobs_dir / arm / "0", m, launched[arm][0])
    out = tmp_path / "out"
    assert tables.main([*map(str, dirs), "--out", str(out), "--n-boot", "50"]) == 0
    assert "every job of the grid (main_dpo_small, recorded at launch in 2 sweep dirs) has a job dir" in \
        (out / "table.md").read_text()


def test_a_corrupt_grid_record_is_named_not_used(tmp_path):
    jobs_dir = tmp_path / "jobs"
    write_job(jobs_dir / "A" / "0", completed("DPO-BT", 0, 1.0, 1.0))
    (jobs_dir / "sweep_grid.json").write_text("{\"arms\": 3}")
    missing, notes = never_started(tables.collect_runs([jobs_dir]), [jobs_dir])
    assert missing == [] and any(str(jobs_dir / "sweep_grid.json") in n for n in notes)


def test_cost_table_shows_threads_and_load_range(paired_sweep, tmp_path):
    """Issue 18.9: threads and the 1-minute load range per method; old runs without them are tolerated."""
    for i, (threads, load) in enumerate(((2, (0.5, 1.25)), (1, (3.0, 7.5)))):
        path = paired_sweep / str(i) / "metrics.json"  # jobs 0 and 1: DPO-HPS and DPO-PL of seed 0
        m = json.loads(path.read_text())
        m["timing"].update(threads=threads, threads_source="auto", load_start=load[0], load_end=load[1])
        path.write_text(json.dumps(m))
    path = paired_sweep / "6" / "metrics.json"  # DPO-HPS, seed 1
    m = json.loads(path.read_text())
    m["timing"].update(threads=4, threads_source="OMP_NUM_THREADS", load_start=2.0)
    path.write_text(json.dumps(m))
    assert tables.main([str(paired_sweep), "--out", str(tmp_path / "o"), "--n-boot", "50"]) == 0
    md = (tmp_path / "o" / "table.md").read_text()
    headers, rows = parse_md_table(md, "## Training cost")
    t, load = headers.index("Threads"), headers.index("Load avg (1 min) at start/end")
    assert rows["DPO-HPS"][t] == "2–4 (mixed) (n=2)" and rows["DPO-HPS"][load] == "0.50–2.00 (n=2)"
    assert rows["DPO-PL"][t] == "1 (auto) (n=1)" and rows["DPO-PL"][load] == "3.00–7.50 (n=1)"
    assert rows["IPO-BT"][t] == "–" and rows["IPO-BT"][load] == "–"  # older runs: absent
    with open(tmp_path / "o" / "table.csv", newline="") as f:
        by_key = {(r["method"], r["metric"]): r for r in csv.DictReader(f) if r["eval_set"] == "timing"}
    r = by_key[("DPO-PL", "load")]
    assert (float(r["lo"]), float(r["hi"]), r["interval"], r["n_seeds"]) == (3.0, 7.5, "range", "1")
    # Without any recorded conditions the table keeps its old columns.
    old = tables.timing_table(tables.collect_runs([paired_sweep / "9"]), n_boot=50)
    assert old.span_columns == [] and "Threads" not in tables.render_table(old)


def test_runs_csv_has_one_row_per_job_with_its_command(sweep):
    """Issue 16: runs.csv = one row per job dir (failed and missing too): overrides, seed, every scalar metric and
    the command that reruns it."""
    import shlex

    assert tables.main([str(sweep), "--n-boot", "50"]) == 0
    with open(sweep / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and [r["job_dir"] for r in rows] == [str(sweep / str(i)) for i in range(12)]
    by_dir = {r["job_dir"]: r for r in rows}
    first = by_dir[str(sweep / "0")]  # IPO-HPS seed 0 (the fixture writes IPO-HPS first)
    assert (first["status"], first["method"], first["seed"]) == ("completed", "IPO-HPS", "0")
    assert shlex.split(first["command"]) == ["python", "-m", "hps_exp", "method=IPO-HPS", "seed=0"]
    assert float(first["eval/hh/aligned/reward_margin"]) == pytest.approx(HH_MARGIN["IPO-HPS"][0])
    assert float(first["eval/pku/aligned/harmful_rate"]) == pytest.approx(0.5 / LEVEL["IPO-HPS"])
    assert float(first["timing/total_s"]) == 1.0 and first["eval/hh/aligned/harmful_rate"] == ""
    assert not any(k.startswith("eval/hh/per_prompt") for k in rows[0])
    failed, missing = by_dir[str(sweep / "10")], by_dir[str(sweep / "11")]
    assert failed["status"] == "failed" and "loss.beta must be > 0" in failed["error"]
    assert missing["status"] == "missing" and missing["seed"] == "7" and missing["overrides"] == "loss=pl seed=7"


def test_circular_evaluation_rows_are_marked(paired_sweep, tmp_path):
    """Issue 16: metrics.json circular_eval=true (the evaluation RM is the annotation RM) marks the row."""
    for num in (0, 6):  # DPO-HPS seeds 0 and 1 of 5
        path = paired_sweep / str(num) / "metrics.json"
        m = json.loads(path.read_text())
        assert m["run"]["method"] == "DPO-HPS"
        m["circular_eval"] = True
        path.write_text(json.dumps(m))
    for num in range(1, 30, 6):  # every DPO-PL run
        path = paired_sweep / str(num) / "metrics.json"
        m = json.loads(path.read_text())
        assert m["run"]["method"] == "DPO-PL"
        m["circular_eval"] = True
        path.write_text(json.dumps(m))
    assert tables.main([str(paired_sweep), "--compare", "HPS", "--out", str(tmp_path / "o"), "--n-boot", "50"]) == 0
    md = (tmp_path / "o" / "table.md").read_text()
    _, rows = parse_md_table(md, "## Main results")
    assert "DPO-HPS ‡ (2/5)" in rows and "DPO-PL ‡" in rows and "DPO-BT" in rows and "IPO-HPS" in rows
    assert "SFT (reference) ‡ (7/30)" in rows
    main_section = md.split("## Main results", 1)[1].split("\n## ", 1)[0]
    assert "‡ circular evaluation" in main_section
    paired = md.split("## Paired tests", 1)[1].split("\n## ", 1)[0]
    assert "| DPO-HPS ‡ | DPO-PL |" in paired and "| IPO-HPS | IPO-BT |" in paired
    cost = md.split("## Training cost", 1)[1].split("\n## ", 1)[0]
    assert "‡" not in cost
    with open(tmp_path / "o" / "runs.csv", newline="") as f:
        marked = {r["job_dir"] for r in csv.DictReader(f) if r["circular_eval"] == "true"}
    assert len(marked) == 7


def test_runs_that_warn_are_listed(paired_sweep, tmp_path):
    """Issue 18 item 5: a diverged run's metrics.json warnings reach the report, naming the job."""
    path = paired_sweep / "0" / "metrics.json"
    m = json.loads(path.read_text())
    m["warnings"] = ["the aligned reward margin on hh is 8123.4 (|margin| > 100): training diverged?"]
    path.write_text(json.dumps(m))
    assert tables.main([str(paired_sweep), "--out", str(tmp_path / "o"), "--n-boot", "20"]) == 0
    section = (tmp_path / "o" / "table.md").read_text().split("## Runs that warn", 1)[1].split("\n## ", 1)[0]
    assert str(paired_sweep / "0") in section and "8123.4" in section and "DPO-HPS" in section
    assert str(paired_sweep / "1") not in section


def test_reference_free_runs_get_their_own_sft_row(paired_sweep, tmp_path):
    """SimPO runs' SFT margins are the SFT policy's own β/|y|·log π: a row of their own, never averaged with the
    log-ratio runs' SFT row (issue 19)."""
    for num in range(2, 30, 6):   # every run of one method becomes reference-free
        path = paired_sweep / str(num) / "metrics.json"
        m = json.loads(path.read_text())
        m["run"].update(reward_type="simpo", beta=2.0)
        m["eval"]["hh"]["sft"]["reward_margin"] = 7.0
        path.write_text(json.dumps(m))
    assert tables.main([str(paired_sweep), "--out", str(tmp_path / "o"), "--n-boot", "20"]) == 0
    _, rows = parse_md_table((tmp_path / "o" / "table.md").read_text(), "## Main results")
    assert "SFT (reference, reward=ratio)" in rows and "SFT (reference, reward=simpo β=2)" in rows



def test_paired_baseline_has_the_treatments_reward_type(paired_sweep):
    """A SimPO baseline's margin (β/|y|·log π) is not a log-ratio margin: a ratio-reward HPS row is tested against
    the best baseline of its own reward type, even when a SimPO row has the higher mean (issue 19)."""
    for num in range(1, 30, 6):   # DPO-PL, the best DPO baseline, becomes reference-free
        path = paired_sweep / str(num) / "metrics.json"
        m = json.loads(path.read_text())
        m["run"].update(reward_type="simpo", beta=2.0)
        path.write_text(json.dumps(m))
    runs = tables.collect_runs([paired_sweep])
    results = {(r.metric, r.treatment): r for r in tables.paired_tests(runs, "HPS") if r.eval_set == "hh"}
    assert results[("reward_margin", "DPO-HPS")].baseline == "DPO-BT"


def test_paired_baseline_has_the_treatments_beta(paired_sweep):
    """A margin is β·Δlog-ratio: a baseline at another β (the authors' released recipe runs β = 0.25) reports its
    log-ratios on another scale, so the HPS row is tested against the best baseline at its own β."""
    for num in range(1, 30, 6):   # DPO-PL, the best DPO baseline, at 2.5x the beta
        path = paired_sweep / str(num) / "metrics.json"
        m = json.loads(path.read_text())
        m["run"].update(beta=0.25)
        path.write_text(json.dumps(m))
    runs = tables.collect_runs([paired_sweep])
    results = {(r.metric, r.treatment): r for r in tables.paired_tests(runs, "HPS") if r.eval_set == "hh"}
    assert results[("reward_margin", "DPO-HPS")].baseline == "DPO-BT"


def paper_protocol(metrics):
    """The same run under eval.protocol=paper: its headline BLEU is the mean sentence BLEU."""
    for ev in metrics["eval"].values():
        for stage in ("sft", "aligned"):
            ev[stage]["bleu_sentence"] = ev[stage].pop("bleu_corpus")
    return metrics


@pytest.mark.parametrize("protocols", [("default",), ("paper",), ("default", "paper")])
def test_bleu_column_names_the_protocols_bleu(tmp_path, protocols):
    """The "BLEU" column is bleu_corpus under the default protocol and bleu_sentence under the paper one, and the
    notes say which; a table holding both keeps them apart, one column each, labelled by kind."""
    root = tmp_path / "sweep"
    for i, protocol in enumerate(protocols):
        m = completed("DPO-HPS", i, 1.0, 3.0)
        write_job(root / str(i), paper_protocol(m) if protocol == "paper" else m, [f"seed={i}"])
    main = tables.main_table(tables.collect_runs([root]), n_boot=50)
    keys = {"default": "bleu_corpus", "paper": "bleu_sentence"}
    bleu_headers = [h for h in main.headers if h.startswith("hh · BLEU") and "char" not in h]
    if len(protocols) == 1:
        key = keys[protocols[0]]
        assert [c for c in main.columns if c[0] == "hh"][0] == ("hh", key) and bleu_headers == ["hh · BLEU ↑"]
        assert main.cell("DPO-HPS", ("hh", key)).mean == pytest.approx(13.0)
        assert [n for n in main.notes if n.startswith("BLEU:")] == [f"BLEU: {tables.HEADLINE_BLEU[key]}."]
        assert f"eval.protocol={protocols[0]}" in tables.HEADLINE_BLEU[key]
    else:
        assert bleu_headers == ["hh · BLEU (corpus) ↑", "hh · BLEU (sentence) ↑"]
        assert {n.split(":")[0] for n in main.notes if n.startswith("BLEU")} == {"BLEU (corpus)", "BLEU (sentence)"}


@pytest.mark.parametrize("protocol", ["default", "paper"])
def test_metrics_written_before_bleu_was_renamed_still_read(tmp_path, protocol):
    """A metrics.json from before BLEU was named by its form says "bleu": under the paper protocol (which also
    writes bleu_char) it is the sentence form, under the default the corpus form, per-prompt lists included."""
    m = completed("DPO-HPS", 0, 1.0, 3.0)
    if protocol == "paper":
        paper_protocol(m)
        for ev in m["eval"].values():
            for stage in ("sft", "aligned"):
                ev[stage]["bleu_char"] = 1.0
            ev["per_prompt"] = {"aligned": {"bleu": [ev["aligned"]["bleu_sentence"]] * 2, "bleu_char": [1.0, 1.0]}}
    key = "bleu_sentence" if protocol == "paper" else "bleu_corpus"
    for ev in m["eval"].values():
        for stage in ("sft", "aligned"):
            ev[stage]["bleu"] = ev[stage].pop(key)
    write_job(tmp_path / "old" / "0", m, ["seed=0"])
    run = tables.collect_runs([tmp_path / "old"])[0]
    assert run.eval["hh"]["aligned"][key] == pytest.approx(13.0) and "bleu" not in run.eval["hh"]["aligned"]
    if protocol == "paper":
        assert run.eval["hh"]["per_prompt"]["aligned"]["bleu_sentence"] == pytest.approx([13.0, 13.0])
    main = tables.main_table([run], n_boot=50)
    assert main.cell("DPO-HPS", ("hh", key)).mean == pytest.approx(13.0)


def write_samples(job_dir, rows):
    (job_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_examples_show_every_methods_first_sample_on_the_same_prompts(tmp_path):
    """examples.md: the first N prompts of the evaluation order that every method has, each method's first sample
    (not its best-rewarded) from its lowest seed, the reference above; ChatML and HH prompts shown as turns."""
    root = tmp_path / "sweep"
    chatml = ("<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi | there<|im_end|>\n"
              "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nhow?<|im_end|>\n<|im_start|>assistant\n")
    hh, other = "\n\nHuman: where?\n\nAssistant:", "\n\nHuman: only BT saw me\n\nAssistant:"
    def row(prompt, tag):
        return {"prompt": prompt, "generations": [f"{tag} first\nline", f"{tag} best"], "rewards": [0.25, 9.0],
                "reference": "ref", "reference_reward": 0.5}
    for num, (method, seed) in enumerate([("DPO-BT", 1), ("DPO-BT", 0), ("DPO-HPS", 0)]):
        job = root / str(num)
        write_job(job, completed(method, seed, 1.0, 1.0), [f"seed={seed}"])
        prompts = [chatml, other, hh] if method == "DPO-BT" else [chatml, hh]
        write_samples(job, [row(p, f"{method}/s{seed}") for p in prompts])
    assert tables.main([str(root), "--n-boot", "20", "--examples", "5"]) == 0
    md = (root / "examples.md").read_text()
    assert md.count("## Prompt") == 2 and "only BT saw me" not in md  # the prompt HPS lacks is skipped
    assert "be nice" not in md and "> **User:** hi \\| there" in md and "> **Assistant:** hello" in md
    assert "> **User:** where?" in md
    assert "| DPO-BT | 0 | 0.25 | DPO-BT/s0 first line |" in md and "/s1" not in md and " best |" not in md
    assert md.index("| DPO-BT |") < md.index("| DPO-HPS |") and "| dataset's reference | – | 0.50 | ref |" in md
    assert tables.main([str(root), "--n-boot", "20", "--examples", "0", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "examples.md").exists()
