"""Reply length per method against the reward: does the evaluation reward model pay for length?

    .venv/bin/python benchmarks/reply_lengths.py outputs/sweeps/smollm2_hh_tuned/seed{0,1,2}

Reads every completed job's `samples.jsonl` (the evaluation's K samples per prompt and the rewards the evaluation
reward model gave them) and its SFT policy's samples (the cached sft_eval stage), and prints per method: samples,
mean words per reply, the Pearson correlation of words and reward over its samples, and the mean reward. A
correlation near 0 says the evaluation reward model does not pay for length: longer replies bought no reward.
Words = whitespace-separated pieces.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hps_exp.tables import collect_runs  # noqa: E402


def words_and_rewards(rows) -> list[tuple[int, float]]:
    return [(len(g.split()), float(r)) for row in rows for g, r in zip(row["generations"], row["rewards"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+")
    ap.add_argument("--cache-dir", default=None, help="where the sft_eval stages are cached (default: the runs')")
    args = ap.parse_args(argv)
    pairs: dict[str, list[tuple[int, float]]] = defaultdict(list)
    sft_seen: set[Path] = set()
    for run in (r for r in collect_runs(args.sweep_dirs) if r.ok):
        lines = (run.job_dir / "samples.jsonl").read_text().splitlines()
        pairs[run.method] += words_and_rewards(json.loads(line) for line in lines)
        cache_dir = Path(args.cache_dir or run.config.get("cache_dir") or "outputs/cache")
        sft = cache_dir / f"sft_eval-{run.sft_eval_key}"   # the tables' reading of identity.stages
        if run.sft_eval_key is None or not (sft / "eval.json").is_file() or sft in sft_seen:
            continue
        sft_seen.add(sft)
        pairs["SFT (reference)"] += words_and_rewards(json.loads((sft / "eval.json").read_text())["samples"])
    print(f"{'method':<22} {'samples':>7} {'words':>6} {'corr(words, reward)':>20} {'reward':>7}")
    for method, v in sorted(pairs.items(), key=lambda kv: (not kv[0].startswith("SFT"), kv[0])):
        words, rewards = [w for w, _ in v], [r for _, r in v]
        print(f"{method:<22} {len(v):>7} {statistics.fmean(words):>6.1f} "
              f"{statistics.correlation(words, rewards):>20.2f} {statistics.fmean(rewards):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
