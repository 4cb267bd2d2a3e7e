"""Fuzzing as a permanent test: generated overrides for every group go through compose + prepare (the validate
path, no training) and end in a named error or a valid run plan, never a traceback of another kind, never a hang.
`make fuzz` runs it longer (HPS_EXP_FUZZ_EXAMPLES)."""
import os
from datetime import timedelta

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

hypothesis = pytest.importorskip("hypothesis")
from conftest import CONF  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hps_exp import app, config  # noqa: E402
from hps_exp.config import ConfigError  # noqa: E402
from hps_exp.data.schema import DataError  # noqa: E402
from hps_exp.models import ModelError  # noqa: E402

EXAMPLES = int(os.environ.get("HPS_EXP_FUZZ_EXAMPLES", "40"))
SMALL = ["dataset.n_train=12", "dataset.n_test=4", "dataset.n_responses=3"]
GROUPS = ["loss", "sampler", "model", "sft", "trainer", "eval", "reward_model", "augment", "logger"]
NAMED = (ConfigError, DataError, ModelError)


def _keys():
    keys = set()
    for group in GROUPS:
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            cfg = config.compose([f"{group}={option}"])
            for k, _ in _leaves(OmegaConf.to_container(cfg[group], resolve=False), f"{group}."):
                if not k.endswith("._target_"):
                    keys.add((option, k))
    return sorted(keys)


def _leaves(node, prefix):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


KEYS = _keys()
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "false", "''", "[]", "[1,2]", "{a: 1}", "nan", "-inf", "1e309", "abc", "-0",
                     "0", "1", "2", "0.5", "dpo", "all", "cosine", "auto", "fp32", "bf16", "ddp"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).map(lambda s: repr(s)),
)


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=20), derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_bad_overrides_end_in_a_named_error(picks):
    overrides = list(SMALL)
    groups = {}
    for (option, key), value in picks:
        group = key.split(".")[0]
        groups.setdefault(group, option)
        if groups[group] != option:
            continue
        overrides.append(f"{key}={value}")
    overrides = [f"{g}={o}" for g, o in groups.items()] + overrides
    named = [k.rsplit(".", 1)[-1] for k in overrides]
    try:
        cfg = config.compose(overrides)
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as e:
        text = f"{e} {e.__cause__}"
        assert any(n.split("=")[0] in text for n in named), text   # Hydra / OmegaConf name the key
        return
    try:
        app.prepare(cfg)
    except NAMED as e:
        assert str(e).strip()
