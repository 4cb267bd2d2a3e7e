"""hps_exp.tables on crafted sweep dirs with known numbers."""
import csv
import json
import math
import statistics
import sys

import pytest

from hps_exp import tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Reward margin on "hh" per method and seed: the cells whose mean/std the tests check by hand.
HH_MARGIN = {"DPO-HPS": [1.0, 1.5, 2.0], "DPO-BT": [0.2, 0.4], "DPO-PL": [0.5, 0.9],
             "IPO-HPS": [1.2, 1.2], "CUSTOM": [0.1]}
# Everything else: a per-method level plus a small per-seed wobble.
LEVEL = {"DPO-HPS": 3.0, "DPO-BT": 1.0, "DPO-PL": 2.0, "IPO-HPS": 4.0, "CUSTOM": 0.5}
SFT = {"bleu": 10.0, "reward": 100.0, "reward_margin": 0.0, "reward_margin_hardest": 0.0}


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
          "aligned": {"bleu": 10 + level + wobble, "reward": level + wobble, "reward_margin": hh_margin,
                      "reward_margin_hardest": hh_margin / 2, "harmful_rate": None}}
    pku = {"sft": {**SFT, "harmful_rate": 0.5},
           "aligned": {"bleu": 20 - level + wobble, "reward": -level + wobble,
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
    # bleu = 10 + level + 0.1*seed over seeds 0, 1, 2
    cell = main.cell("DPO-HPS", ("hh", "bleu"))
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
    assert rows["DPO-HPS"][col] == "**1.50 ± 0.50**"
    assert rows["DPO-BT"][col] == "0.30 ± 0.14"
    assert rows["CUSTOM"][col] == "0.10"  # one seed: no ±
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
    assert rows["SFT (reference)"][headers.index("hh · Reward ↑")] == "100.00 ± 0.00"  # same in all 3 seeds
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
    assert list(rows[0]) == ["method", "eval_set", "metric", "mean", "std", "n_seeds"]
    # 6 rows (SFT + 5 methods) x (hh: 3 metrics + pku: 4 with the harmful rate).
    assert len(rows) == 6 * 7
    by_key = {(r["method"], r["eval_set"], r["metric"]): r for r in rows}
    r = by_key[("DPO-HPS", "hh", "reward_margin")]
    assert float(r["mean"]) == pytest.approx(1.5) and float(r["std"]) == pytest.approx(0.5)
    assert r["n_seeds"] == "3"
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
    assert rows["DPO-HPS"][headers.index("hh · Reward margin (hardest) ↑")] == "**0.75 ± 0.25**"


def test_method_sort_order():
    methods = ["NCA-BT", "CUSTOM", "DPO-HPS", "SPPO-PL", "DPO-BT", "IPO-HPS", "EXO-BT", "ABC-X", "DPO-PL"]
    assert sorted(methods, key=tables.method_sort_key) == [
        "DPO-BT", "DPO-PL", "DPO-HPS", "IPO-HPS", "EXO-BT", "SPPO-PL", "NCA-BT", "ABC-X", "CUSTOM"]


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


def test_ablation_section_and_plots(n_sweep, capsys):
    pytest.importorskip("matplotlib")
    assert tables.main([str(n_sweep)]) == 0
    md = (n_sweep / "table.md").read_text()
    headers, rows = parse_md_table(md, "## Ablation: Reward margin vs n_resp")
    assert headers[2:5] == ["hh · n_resp=2", "hh · n_resp=4", "hh · n_resp=8"]
    assert rows["DPO-HPS"][2:5] == ["1.21 ± 0.01", "1.41 ± 0.01", "1.81 ± 0.01"]
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
    assert "matplotlib is not installed" in capsys.readouterr().err


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
    assert "metrics.json" in text and "lacks run.method" in text
