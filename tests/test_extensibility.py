"""A new loss is one class plus one yaml: added from outside the package, it runs end to end."""
import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

LOSS = '''
import torch.nn.functional as F
from hps_exp.losses import PreferenceLoss


class HingeLoss(PreferenceLoss):
    """A pairwise hinge on the implicit reward margin: max(0, 1 - (r_w - r_l))."""
    input_kind = "pair"
    natural_sampler = "best_worst"
    preference_model = "Hinge"

    def _losses(self, r, mask, scores, num_negatives):
        return F.relu(1.0 - (r[:, 0] - r[:, 1])), {}
'''

YAML = '''
_target_: my_losses.HingeLoss
name: hinge
beta: 0.1
label_smoothing: 0.0
framework: dpo
'''


def test_a_loss_added_outside_the_package_runs_end_to_end(tmp_path):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent(LOSS))
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "hinge.yaml").write_text(textwrap.dedent(YAML))
    args = ["loss=hinge", f"hydra.searchpath=[file://{tmp_path}/conf]", "dataset.n_train=24", "dataset.n_test=6",
            "dataset.n_responses=3", "sft.epochs=1", "trainer.epochs=1", "trainer.batch_size=8",
            "eval.max_prompts=4", "eval.max_new_tokens=8", "model.n_embd=32", "model.n_layer=1",
            "logger.mode=disabled", f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "hps_exp", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["run"]["method"], m["run"]["sampler"], m["run"]["preference_model"]) == ("DPO-Hinge", "best_worst",
                                                                                       "Hinge")
    assert m["timing"]["pref_steps"] == 3   # 24 prompts / batch 8, one epoch
