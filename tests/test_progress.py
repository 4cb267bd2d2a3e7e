"""Progress off a terminal (a log file, CI, a SLURM job): plain lines every 10 %, never a flood of \\r redraws."""
import io

import torch

from hps_exp import progress
from hps_exp.trainer import Trainer
from tests.test_trainer import cfg, fresh, loop, make_epoch, step


def test_a_bar_into_a_file_writes_a_line_every_ten_percent(monkeypatch):
    monkeypatch.delenv("HPS_EXP_NO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress.progress_bar(total=200, desc="augment", file=out)
    for _ in range(200):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 10 <= len(lines) <= 11 and all(line.startswith("augment") for line in lines)
    assert "200/200" in lines[-1]


def test_training_logs_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("HPS_EXP_NO_PROGRESS", raising=False)
    Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, stage="sft").fit(make_epoch, 8, step)
    err = capsys.readouterr().err
    assert "\r" not in err and 1 <= err.count("sft") <= 11 and "12/12" in err
