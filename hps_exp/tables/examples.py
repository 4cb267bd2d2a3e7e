"""Example generations beside the tables: for the first N held-out prompts of the evaluation order (the same
prompts for every method, not picked by anyone), each method's first sample (of the K the protocol draws; not its
best-rewarded one) with the reward the evaluation reward model gave it, under the dataset's reference reply. One
seed per method: the lowest it has. Read from the job dirs' samples.jsonl (written by every evaluated job)."""
from __future__ import annotations

import re
from pathlib import Path

from hps_exp.data.chat import turns as transcript_turns
from hps_exp.data.schema import read_jsonl
from hps_exp.tables.aggregate import build_rows, value_key
from hps_exp.tables.collect import Run

SAMPLES_FILE = "samples.jsonl"
MAX_TURN_CHARS = 400      # a long dialogue turn is cut: the reply is what the example shows
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


def read_samples(job_dir: Path) -> list[dict]:
    """The job's samples.jsonl rows (prompt, generations, rewards, reference, ...); [] when it has none."""
    path = job_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    return [row for _, row in read_jsonl(path) if isinstance(row.get("prompt"), str)]


def dialogue_turns(prompt: str) -> list[tuple[str, str]]:
    """(speaker, text) per turn of a rendered prompt: a ChatML template (SmolLM2's; its system turn dropped) or
    the HH-RLHF transcript format; the whole prompt as one user turn otherwise. The open assistant turn the
    prompt ends with is not a turn."""
    if "<|im_start|>" in prompt:
        found = [(role, text.strip()) for role, text in _CHATML_TURN.findall(prompt) if role != "system"]
    else:
        found = [(m["role"], m["content"]) for m in transcript_turns(prompt)]
    return [(who, text) for who, text in found if text]


def _cut(text: str, limit: int = MAX_TURN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _cell(text: str) -> str:
    """One Markdown table cell: no pipes or line breaks."""
    return " ".join(text.replace("|", "\\|").split()) or "*(empty)*"


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def examples_markdown(runs: list[Run], n_prompts: int = 3) -> str | None:
    """The examples as Markdown, methods in the tables' row order; None when no completed run has samples."""
    picked = []  # (row label, run, samples by prompt)
    for row in build_rows([r for r in runs if r.ok]):
        for run in sorted(row.runs, key=lambda r: (value_key(r.run.get("seed")), str(r.job_dir))):
            samples = read_samples(run.job_dir)
            if samples:
                picked.append((row.label, run, {s["prompt"]: s for s in samples}, samples))
                break
    if not picked:
        return None
    # The evaluation order of the first method; prompts every picked method was evaluated on.
    prompts = [s["prompt"] for s in picked[0][3] if all(s["prompt"] in by for _, _, by, _ in picked)][:n_prompts]
    lines = ["# Example generations", "",
             f"The first {len(prompts)} held-out prompts of the evaluation order (the same for every method, not "
             "picked); per method its first sample (of the K the evaluation draws, so not its best-rewarded one) "
             "and the reward the evaluation reward model gave it; the dataset's reference reply above. One seed "
             "per method: the lowest it has (named in the row)."]
    for i, prompt in enumerate(prompts, 1):
        lines += ["", f"## Prompt {i}", ""]
        lines += [f"> **{who.capitalize()}:** {_cell(_cut(text))}  " for who, text in dialogue_turns(prompt)]
        first = picked[0][2][prompt]
        lines += ["", "| Method | Seed | Reward | Reply |", "|:---|---:|---:|:---|",
                  f"| dataset's reference | – | {_fmt(first.get('reference_reward'))} | "
                  f"{_cell(str(first.get('reference', '')))} |"]
        for label, run, by_prompt, _ in picked:
            s = by_prompt[prompt]
            gens, rewards = s.get("generations") or [""], s.get("rewards") or [None]
            lines.append(f"| {label} | {run.run.get('seed', '?')} | {_fmt(rewards[0])} | {_cell(str(gens[0]))} |")
    return "\n".join(lines) + "\n"
