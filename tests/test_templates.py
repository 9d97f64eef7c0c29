"""Chat templates (DESIGN.md §7): exact strings and agreement between training text and prompts."""
import pytest

from longalign.templates import (CLOSE, PROMPT, REPLY, build_prompt, conversation_segments,
                                 conversation_text, round_prompt)

ROUNDS = [("Hi", "Hello!"), ("What is 2+2?", "4"), ("Thanks", "You're welcome.")]


def test_chatglm_single_round_prompt():
    assert build_prompt("chatglm", [], "你好") == "[Round 1]\n\n问：你好\n\n答："


def test_chatglm_prompt_with_history():
    expected = ("[Round 1]\n\n问：Hi\n\n答：Hello!\n\n"
                "[Round 2]\n\n问：What is 2+2?\n\n答：4\n\n"
                "[Round 3]\n\n问：Thanks\n\n答：")
    assert build_prompt("chatglm", ROUNDS[:2], "Thanks") == expected


def test_llama_single_round_prompt():
    assert build_prompt("llama", [], "Summarize this.") == "[INST]Summarize this.[/INST]"


def test_llama_prompt_with_history():
    expected = "[INST]Hi[/INST]Hello!\n\n[INST]What is 2+2?[/INST]4\n\n[INST]Thanks[/INST]"
    assert build_prompt("llama", ROUNDS[:2], "Thanks") == expected


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_training_text_is_prompt_plus_last_reply(family):
    """pre_tokenize's text for a conversation == the inference prompt + the answer."""
    history, (query, answer) = ROUNDS[:-1], ROUNDS[-1]
    assert conversation_text(family, ROUNDS) == build_prompt(family, history, query) + answer


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_segments_kinds_and_order(family):
    segments = conversation_segments(family, ROUNDS)
    assert [s.kind for s in segments] == [PROMPT, REPLY, CLOSE, REPLY, CLOSE, REPLY]
    assert [s.text for s in segments if s.kind == REPLY] == [a for _, a in ROUNDS]
    assert all(s.text.startswith("\n\n") for s in segments if s.kind == CLOSE)
    assert segments[2].text == "\n\n" + round_prompt(family, 2, "What is 2+2?")


def test_no_rounds_gives_no_segments():
    assert conversation_segments("llama", []) == []


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown model family"):
        build_prompt("gpt", [], "hi")


def test_round_index_is_one_based():
    with pytest.raises(ValueError, match="1-based"):
        round_prompt("chatglm", 0, "hi")
