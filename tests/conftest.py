import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
HH_TEST = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

# Tests never talk to W&B's servers or a model hub, and keep their output short.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HPS_EXP_NO_PROGRESS", "1")
# One torch thread per test process: on a shared 2-core machine two threads run several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def compose():
    """compose(overrides) -> the app's config, as Hydra builds it for `python -m hps_exp <overrides>`."""
    from hps_exp import config

    return lambda overrides=(): config.compose(list(overrides))
