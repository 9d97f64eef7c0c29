"""longalign.data.jinja_template renders exactly the training prompt of longalign.data.training_format (both
families, multi-round, with and without a generation prompt); the ChatGLM remote code's chat()
builds the same prompt."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from longalign.data.jinja_template import attach_chat_template, jinja_chat_template
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration
from longalign.data.training_format import build_prompt, conversation_text

ROUNDS = [("What is the key?", "  The key is 42.\n"), ("问：钥匙在哪里？", "在桌子上。\n\n第二段"),
          ("Quote: '[INST]' and \\n and {{ braces }}", "It's fine.")]


def messages(history, query=None, system=None):
    out = [{"role": "system", "content": system}] if system is not None else []
    out += [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]
    return out + ([{"role": "user", "content": query}] if query is not None else [])


SYSTEM = "You are LongAlign. Quote: '<<SYS>>' \\n {{ x }}\nSecond line."


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("family", ["llama", "chatglm"])
@pytest.mark.parametrize("n_history", [0, 1, 2])
def test_template_renders_the_training_prompt(family, n_history, tokenizer):
    template = jinja_chat_template(family, prefix="<s>")
    history, query = ROUNDS[:n_history], ROUNDS[n_history][0]
    text = tokenizer.apply_chat_template(messages(history, query), chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s>" + build_prompt(family, history, query)


@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_finished_conversation_is_the_training_text(family, tokenizer):
    """A conversation ending with the assistant renders the text pre_tokenize trains on."""
    template = jinja_chat_template(family, prefix="")
    text = tokenizer.apply_chat_template(messages(ROUNDS), chat_template=template, tokenize=False)
    expected = build_prompt(family, ROUNDS[:-1], ROUNDS[-1][0]) + ROUNDS[-1][1]
    assert text == expected


def test_chatglm_answer_header_is_the_generation_prompt(tokenizer):
    template = jinja_chat_template("chatglm", prefix="[gMASK]sop")
    plain = tokenizer.apply_chat_template(messages([], "hi"), chat_template=template, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(messages([], "hi"), chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    assert plain == "[gMASK]sop[Round 1]\n\n问：hi" and with_prompt == plain + "\n\n答："


@pytest.mark.parametrize("bad", [[{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}],
                                 [{"role": "assistant", "content": "x"}],
                                 [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
                                 [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
                                 [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]])
def test_other_roles_and_orders_are_errors(bad, tokenizer):
    with pytest.raises(Exception, match="LongAlign chat formats|alternate|only open"):
        tokenizer.apply_chat_template(bad, chat_template=jinja_chat_template("llama", ""), tokenize=False)


def test_attached_template_writes_the_tokenizers_own_prefix(tokenizer):
    attach_chat_template(tokenizer, "llama")
    ids = tokenizer.apply_chat_template(messages([], "hi"), tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer(build_prompt("llama", [], "hi"))["input_ids"]  # add_special_tokens=True


class _PromptRecorder:
    """Stands for a tokenizer: records the prompt chat() builds, then stops it."""
    eos_token_id, pad_token_id = 2, 0

    def __call__(self, texts, **kwargs):
        self.prompt = texts[0]
        raise StopIteration


def test_remote_code_chat_builds_the_training_prompt():
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(num_layers=1, padded_vocab_size=32, hidden_size=16,
                                                          ffn_hidden_size=32, kv_channels=8, num_attention_heads=2,
                                                          multi_query_group_num=1, rope_ratio=1.0))
    recorder = _PromptRecorder()
    for n in range(3):
        with pytest.raises(StopIteration), torch.no_grad():
            model.chat(recorder, ROUNDS[n][0], history=ROUNDS[:n])
        assert recorder.prompt == build_prompt("chatglm", ROUNDS[:n], ROUNDS[n][0])


@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_assistant_edge_whitespace_is_stripped_like_the_training_text(family, tokenizer):
    """templates.reply_text strips replies in the training text; the template trims them too."""
    rounds = [(" q1 ", "\n  a1  \n"), ("q2", " a2 ")]
    template = jinja_chat_template(family, prefix="")
    text = tokenizer.apply_chat_template(messages(rounds), chat_template=template, tokenize=False)
    assert text == build_prompt(family, rounds[:1], rounds[1][0]) + "a2"
    assert " q1 " in text and "\n  a1" not in text


@pytest.mark.parametrize("family", ["llama", "chatglm"])
@pytest.mark.parametrize("n_history", [0, 1, 2])
def test_system_message_renders_as_the_training_text_writes_it(family, n_history, tokenizer):
    template = jinja_chat_template(family, prefix="<s>")
    history, query = ROUNDS[:n_history], ROUNDS[n_history][0]
    text = tokenizer.apply_chat_template(messages(history, query, SYSTEM), chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s>" + build_prompt(family, history, query, SYSTEM)
    finished = tokenizer.apply_chat_template(messages(ROUNDS, system=SYSTEM), chat_template=template, tokenize=False)
    assert finished == "<s>" + conversation_text(family, ROUNDS, SYSTEM)
    expected_block = {"llama": "[INST]<<SYS>>\n" + SYSTEM + "\n<</SYS>>\n\n", "chatglm": "<|system|>\n" + SYSTEM}
    assert text.startswith("<s>" + expected_block[family])
