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


def load_pretrained(name_or_path: str):
    """Tokenizer + causal LM from the hub or a local directory, with an actionable error offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model '{name_or_path}' ({first}). Offline or no such model? "
            f"Point at a local copy saved with save_pretrained: model.name_or_path=/path/to/model_dir, "
            f"or use the embedded default model=tiny") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


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
