"""The figures (matplotlib, imported only when plotting): the main figure (a panel row per framework and eval
set, a column per metric, a bar per preference model in the same colour and place everywhere, intervals as error
bars, values in a strip above them) and one line plot per ablation key."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Iterable

from hps_exp.io import atomic_write_bytes
from hps_exp.tables.aggregate import (
    HEADLINE_BLEU,
    KEY_LABELS,
    LEVEL,
    MARGINS,
    METRIC_LABELS,
    ROW_ORDER,
    SFT_LABEL,
    Cell,
    Row,
    Table,
    fmt_value,
    row_order_of,
)

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

# Okabe-Ito (colour-blind safe) then tab10-like extras: one colour per series, never reused; past the end,
# colours repeat with a hatch, so (colour, hatch) stays unique.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000",
           "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo")


def _save_png(fig: Figure, path: Path) -> None:
    # rendered to memory, then written atomically: a crash never leaves half a PNG
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def series_styles(rows: list[Row]) -> dict[str, tuple[str, str]]:
    """Series (preference model + split settings) -> (colour, hatch), in row order: never two alike."""
    def key(row: Row) -> tuple:  # by preference-model rank, then name
        return (row_order_of(row.runs[0])[1] if row.runs else len(ROW_ORDER["preference_model"]), row.series)
    series = list(dict.fromkeys(row.series for row in sorted(rows, key=key)))
    return {s: (PALETTE[i % len(PALETTE)], HATCHES[(i // len(PALETTE)) % len(HATCHES)]) for i, s in enumerate(series)}


def _err(cells: list[Cell | None]) -> list[list[float]]:
    """Asymmetric error bars (below, above the mean) from the intervals."""
    return [[max(0.0, c.mean - c.lo) if c else 0.0 for c in cells],
            [max(0.0, c.hi - c.mean) if c else 0.0 for c in cells]]


def plot_main(plt: ModuleType, main: Table, margins: Iterable[str], path: Path) -> None:
    """One panel row per (framework, eval set), one column per metric (the headline BLEU, reward, then every margin
    given, e.g. the mean and the hardest-negative one): a bar per preference model (the same colour and place in every
    panel), the intervals as error bars, SFT as a dashed line, and the values in a strip along the top of each
    panel, above every error bar (never on one)."""
    rows = [main.row_info[r] for r in main.rows if r in main.row_info]
    margins = [m for m in margins if any(c[1] == m for c in main.columns)]
    eval_sets = sorted({e for e, m in main.columns if m in margins})
    metrics = [m for m in (*HEADLINE_BLEU, "reward") if any(c[1] == m for c in main.columns)] + margins
    frameworks = list(dict.fromkeys(row.framework for row in rows))
    panels = [(fw, e) for fw in frameworks for e in eval_sets]
    styles = series_styles(rows)
    series = list(styles)
    vertical = len(series) > 5  # many bars: labels turned, so they keep to their bar
    fig, axes = plt.subplots(len(panels), len(metrics), squeeze=False, sharex=True,
                             figsize=(max(2.4, 0.45 * len(series) + 0.6) * len(metrics), 2.1 * len(panels) + 0.9))
    for i, (fw, e) in enumerate(panels):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            bars = []
            for k, s in enumerate(series):
                match = [row for row in rows if row.framework == fw and row.series == s]
                cell = main.cell(match[0].label, (e, m)) if match else None
                if cell is None:
                    continue
                colour, hatch = styles[s]
                ax.bar([k], [cell.mean], 0.8, yerr=_err([cell]), capsize=2, color=colour, hatch=hatch,
                       edgecolor="white" if not hatch else "black", linewidth=0.5, label=s)
                bars.append((k, cell))
            ax.set_xticks(range(len(series)), series, rotation=30, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(main.metric_labels.get(m) or METRIC_LABELS.get(m, m), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{fw.upper() or '–'} · {e}", fontsize=9, fontweight="bold")
            if not bars:   # a set measured for its margins alone (ranked_margins): say so, draw nothing
                ax.text(0.5, 0.5, "not measured\non this set", transform=ax.transAxes, ha="center", va="center",
                        fontsize=8, color="0.4")
                ax.set_yticks([])
                continue
            sft = [main.cell(r, (e, m)) for r in main.rows if r in main.reference_rows]
            values = [v for _, c in bars for v in (c.lo, c.hi, c.mean)] + [0.0]
            if sft and sft[0] is not None and m not in margins:
                ax.axhline(sft[0].mean, color="0.4", linestyle="--", linewidth=1, label=SFT_LABEL)
                values.append(sft[0].mean)
            ax.axhline(0.0, color="black", linewidth=0.6)
            lo, hi = min(values), max(values)
            span = (hi - lo) or 1.0
            strip = 0.32 if vertical else 0.16  # the top share of the panel that holds the value labels
            top = hi + 0.03 * span
            ax.set_ylim(lo - 0.05 * span, top + (top - (lo - 0.05 * span)) * strip / (1 - strip))
            for k, c in bars:  # x in data, y in axes coordinates: inside the strip, above every error bar
                ax.annotate(f"{c.mean:.2f}", (k, 0.985), xycoords=ax.get_xaxis_transform(), ha="center",
                            va="top", fontsize=6.5, rotation=90 if vertical else 0)
    handles, labels = [], []
    for ax in axes.flat:  # the union of legends, once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8, title_fontsize=9,
               title=f"Mean over seeds, error bars = {LEVEL:.0%} bootstrap interval", bbox_to_anchor=(0.5, 1.0))
    _save_png(fig, path)
    plt.close(fig)


def plot_ablation(plt: ModuleType, table: Table, key: str, metric: str, path: Path) -> None:
    """Metric vs the ablation value, one line per method, one panel per eval set, intervals as error bars."""
    eval_sets = sorted({e for e, _ in table.columns})
    values = [v for e, v in table.columns if e == eval_sets[0]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fig, axes = plt.subplots(1, len(eval_sets), figsize=(5.0 * len(eval_sets), 3.8), squeeze=False)
    markers = "osD^v<>p"
    for ax, e in zip(axes[0], eval_sets):
        for i, row in enumerate(table.rows):
            pts = [(v, c) for v in values if (c := table.cell(row, (e, v))) is not None]
            xs = [v if numeric else values.index(v) for v, _ in pts]
            ax.errorbar(xs, [c.mean for _, c in pts], yerr=_err([c for _, c in pts]), marker=markers[i % len(markers)],
                        capsize=3, label=row, color=PALETTE[i % len(PALETTE)])  # one colour per line
        ax.set_xticks(values if numeric else range(len(values)), [fmt_value(v) for v in values])
        ax.set_xlabel(KEY_LABELS.get(key, key))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(e)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{table.title}; error bars = {LEVEL:.0%} bootstrap interval", fontsize=9)
    _save_png(fig, path)
    plt.close(fig)


def make_plots(main: Table, ablations: dict[str, Table], out: Path, margin: str,
               plot_table: Table | None = None) -> list[Path]:
    """`<margin>.png` (from plot_table, which carries both margins, else the main table) and `vs_<key>.png`."""
    try:
        import matplotlib  # lazy: the tables work without it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[tables] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    if any(m == margin for _, m in main.columns) and main.row_info:
        plot_main(plt, plot_table or main, [margin, *(m for m in MARGINS if m != margin)], out / f"{margin}.png")
        written.append(out / f"{margin}.png")
    for key, table in ablations.items():
        plot_ablation(plt, table, key, margin, out / f"vs_{key}.png")
        written.append(out / f"vs_{key}.png")
    return written

