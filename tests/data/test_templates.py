"""Chat templates (DESIGN.md §7): exact strings and agreement between training text and prompts."""
import pytest

from longalign.data.training_format import (CLOSE, CONTROL, PROMPT, REPLY, build_prompt, conversation_segments,
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


def test_llama_system_prompt_is_a_sys_block_inside_the_first_inst():
    expected = "[INST]<<SYS>>\nBe brief.\n<</SYS>>\n\nHi[/INST]Hello!\n\n[INST]What is 2+2?[/INST]"
    assert build_prompt("llama", ROUNDS[:1], "What is 2+2?", system="Be brief.") == expected
    assert conversation_text("llama", ROUNDS[:1], "Be brief.") == expected.split("\n\n[INST]What")[0]


def test_chatglm_system_prompt_is_its_role_token_and_header_before_round_one():
    expected = "<|system|>\nBe brief.[Round 1]\n\n问：Hi\n\n答："
    assert build_prompt("chatglm", [], "Hi", system="Be brief.") == expected
    segments = conversation_segments("chatglm", ROUNDS[:2], "Be brief.")
    assert [s.kind for s in segments] == [CONTROL, PROMPT, REPLY, CLOSE, REPLY]
    assert (segments[0].text, segments[1].text) == ("<|system|>", "\nBe brief.[Round 1]\n\n问：Hi\n\n答：")


@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_system_prompt_is_never_a_reply_and_absent_means_unchanged(family):
    with_system = conversation_segments(family, ROUNDS, "SYSTEM TEXT")
    assert not any("SYSTEM TEXT" in s.text for s in with_system if s.kind != PROMPT)
    assert conversation_segments(family, ROUNDS, None) == conversation_segments(family, ROUNDS)
    assert conversation_text(family, ROUNDS, "S") == build_prompt(family, ROUNDS[:-1], ROUNDS[-1][0], "S") + \
        ROUNDS[-1][1]
    with pytest.raises(ValueError, match="round 1"):
        round_prompt(family, 2, "q", system="S")
