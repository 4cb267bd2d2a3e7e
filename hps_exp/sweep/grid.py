"""Sweep files (`sweeps/NAME.yaml`, format in hps_exp/sweep/__init__.py): validation, the overrides of each arm's
multirun (precedence extra > arm > grid > fixed) and their expansion into jobs exactly as Hydra's basic sweeper
does, through Hydra's public override parser."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[2]
SWEEPS_DIR = REPO / "sweeps"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
TOP_KEYS = {"description", "arms", "grid", "fixed", "requires", "compare"}
COMPARE_KEYS = {"treatment", "baselines"}


class SweepError(ValueError):
    """A bad sweep file or command line; the message says what to fix."""


@dataclass
class Sweep:
    name: str
    path: Path
    description: str
    arms: dict[str, list[str]]
    grid: dict[str, list[str]]          # key -> values (as Hydra override value strings)
    fixed: list[str]
    requires: list[str] = field(default_factory=list)
    # The tables' paired test: {"treatment": preference model, "baselines": [preference models] (default: all others)}
    compare: dict[str, Any] = field(default_factory=dict)



# ------------------------------------------------------------------------------------------------ load

def available() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def locate(name: str) -> Path:
    """A sweep name in sweeps/ or a path to a yaml file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = SWEEPS_DIR / f"{name}.yaml"
    if "/" not in name and candidate.is_file():
        return candidate
    raise SweepError(f"unknown sweep {name!r}; available: {', '.join(available()) or '(none)'} "
                     f"(or give a path to a sweep .yaml file)")


def _value_str(where: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise SweepError(f"{where}: value {v!r}: use a scalar (string or number)")


def _values(where: str, raw: Any) -> list[str]:
    """A grid axis: a comma string or a YAML list (or one scalar) -> Hydra override value strings."""
    if isinstance(raw, str):
        vals = [v.strip() for v in raw.split(",")]
    elif isinstance(raw, list):
        vals = [_value_str(where, v) for v in raw]
    else:
        vals = [_value_str(where, raw)]
    if not vals or any(v == "" for v in vals):
        raise SweepError(f"{where}: empty value in {raw!r}")
    return vals


def _overrides(where: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(o, str) and "=" in o for o in raw):
        raise SweepError(f"{where}: expected a list of key=value overrides; got {raw!r}")
    return list(raw)


def _valid_compare(compare: Any) -> bool:
    if not isinstance(compare, dict) or set(compare) - COMPARE_KEYS:
        return False
    baselines = compare.get("baselines", [])
    return isinstance(compare.get("treatment"), str) and bool(compare["treatment"]) \
        and isinstance(baselines, list) and all(isinstance(b, str) and b for b in baselines)


def _read_mapping(path: Path) -> dict:
    """The sweep file's top-level mapping, its keys checked."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with arms/grid/fixed")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}")
    return data


def _arms(path: Path, raw: Any) -> dict[str, list[str]]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{path}: 'arms' must map arm names to override lists")
    arms = {}
    for arm, ovs in raw.items():
        if not ARM_NAME.match(str(arm)):
            raise SweepError(f"{path}: arm name {arm!r} must be a plain directory name ([A-Za-z0-9_.+-])")
        arms[str(arm)] = _overrides(f"{path}: arms.{arm}", ovs)
    return arms


def _grid(path: Path, raw: Any) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: 'grid' must map keys to comma lists")
    return {str(k): _values(f"{path}: grid.{k}", v) for k, v in raw.items()}


def load(name: str) -> Sweep:
    """The sweep file `name` (in sweeps/, or a path), validated: SweepError names the file and the key."""
    path = locate(name)
    data = _read_mapping(path)
    arms = _arms(path, data.get("arms"))
    grid = _grid(path, data.get("grid") or {})
    requires = data.get("requires") or []
    if not isinstance(requires, list):
        raise SweepError(f"{path}: 'requires' must be a list of keys")
    compare = data.get("compare") or {}
    if compare and not _valid_compare(compare):
        raise SweepError(f"{path}: 'compare' must be a mapping like {{treatment: <preference model>, baselines: "
                         f"[<preference model>, ...]}} (baselines optional); got {compare!r}")
    return Sweep(path.stem, path, str(data.get("description", "")), arms, grid,
                 _overrides(f"{path}: fixed", data.get("fixed")), [str(r) for r in requires], dict(compare))


# ---------------------------------------------------------------------------------------------- expand

def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(*layers: list[str]) -> list[str]:
    """Concatenate override lists; a later layer's key replaces an earlier one's (in the earlier position)."""
    out: dict[str, str] = {}
    for layer in layers:
        for o in layer:
            out[key_of(o)] = o
    return list(out.values())


def grid_overrides(sweep: Sweep) -> list[str]:
    return [f"{k}={','.join(vs)}" for k, vs in sweep.grid.items()]


def arm_overrides(sweep: Sweep, arm: str, extra: Sequence[str] = ()) -> list[str]:
    """The overrides of one arm's multirun (without the hydra.sweep.* keys); `sweep=NAME` labels every job."""
    owned = [o for o in extra if key_of(o).startswith("hydra.sweep.")]
    if owned:
        raise SweepError(f"{' '.join(owned)}: the runner sets hydra.sweep.dir/subdir; use --jobs-dir DIR")
    return merge(sweep.fixed, grid_overrides(sweep), sweep.arms[arm], [f"sweep={sweep.name}"], list(extra))


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of these overrides, in job-number order: one axis per key (in the
    order keys first appear; a later override of a key replaces its values), the product of the axes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise SweepError(f"bad override: {e}") from None
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep() and o.value_type is not ValueType.GLOB_CHOICE_SWEEP:
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:  # interval(), or glob() (whose values come from the config search path, not from the override)
            raise SweepError(f"{o.input_line}: a multirun axis must be a comma list, choice() or range()")
    return [list(job) for job in itertools.product(*axes.values())]


def jobs(sweep: Sweep, extra: Sequence[str] = ()) -> dict[str, list[list[str]]]:
    """Arm -> the override list of each of its jobs (job k = element k)."""
    return {arm: expand(arm_overrides(sweep, arm, extra)) for arm in sweep.arms}


def missing_required(sweep: Sweep, extra: Sequence[str]) -> list[str]:
    given = {key_of(o) for o in extra}
    return [k for k in sweep.requires if k not in given]



def launcher_of(sweep: Sweep, extra: Sequence[str] = ()) -> str:
    """The hydra/launcher the jobs use ("basic" unless the sweep file or the command line sets one)."""
    chosen = [o.split("=", 1)[1] for o in merge(sweep.fixed, list(extra)) if key_of(o) == "hydra/launcher"]
    return chosen[-1] if chosen else "basic"


