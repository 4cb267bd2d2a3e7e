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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hps_exp import config

    config.register()

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    return _compose
