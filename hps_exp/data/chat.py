"""The model's chat template on the datasets' dialogue (`model.chat_template=true`, the paper's setting).

Every loader writes prompts in the HH-RLHF transcript format ("\\n\\nHuman: …\\n\\nAssistant: …\\n\\nAssistant:");
an instruction-tuned model was trained on its own template instead (SmolLM2: "<|im_start|>user\\n…<|im_end|>").
`render` parses the transcript into turns and lets the tokenizer's template write the prompt, ending with the
assistant's generation prompt; responses lose the space that followed "Assistant:". The encoded response then
ends with the tokenizer's eos, which for such models is the template's end-of-turn token, so training teaches
the model to end its turn and generation stops there. The rendered text is the data: its fingerprint (and every
cache key downstream) follows the template.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from hps_exp.data.schema import Example

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def turns(prompt: str) -> list[dict[str, str]]:
    """The transcript's turns as chat messages, without the empty final "Assistant:" (the reply to write).
    Text before the first role tag (or a prompt with none) is a user turn."""
    parts = _TURN.split(prompt)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLES[role], "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def render(examples: Sequence[Example], tok) -> list[Example]:
    """The examples with prompts written by the tokenizer's chat template (generation prompt appended)."""
    out = []
    for ex in examples:
        prompt = tok.apply_chat_template(turns(ex.prompt), tokenize=False, add_generation_prompt=True)
        out.append(dataclasses.replace(ex, prompt=prompt, responses=tuple(r.lstrip() for r in ex.responses)))
    return out
