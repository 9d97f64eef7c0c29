"""Exact ids and labels of both families, on the tokenizers the families really use:
a sentencepiece Llama-2-style tokenizer directory (converted to a fast tokenizer) and a python
ChatGLM3-like tokenizer (`[gMASK] sop` prefix, role commands), plus the byte-level demo one.

The expected values are written from the rules, without the segment machinery under test:
ids = the tokenizer's prefix (written out per family) + `tokenizer(training text)` (the text
written out literally below) + EOS; reply k occupies the tokens between the encodings of the
text up to its start and up to its end; labels are those tokens, and EOS on the position right
after each non-empty reply.
"""
import pytest
from transformers import AutoTokenizer

from longalign.constants import IGNORE_INDEX as X
from longalign.data.tokenization import ConversationTokenizer
from helpers.tokenizer_builders import CHATGLM3_COMMANDS, build_chatglm3_like_tokenizer, build_llama2_sentencepiece_dir

CONTROL_STRINGS = "</s> <s> <unk> [INST] [/INST] [gMASK] sop [sMASK] <|user|> <|assistant|> <|observation|>"


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_llama2_sentencepiece_dir(tmp_path_factory.mktemp("llama2_sp")))


@pytest.fixture(scope="module")
def chatglm3_tokenizer(tmp_path_factory):
    return build_chatglm3_like_tokenizer(tmp_path_factory.mktemp("chatglm3_like"))


@pytest.fixture(params=["llama2", "chatglm3", "byte_level_llama", "byte_level_chatglm"])
def case(request, llama2_tokenizer, chatglm3_tokenizer, tiny_tokenizer):
    """(family, tokenizer, expected prefix ids) — the prefix written out, not probed."""
    if request.param == "llama2":
        return "llama", llama2_tokenizer, [1]  # <s>, id 1 as in Llama-2's tokenizer.model
    if request.param == "chatglm3":
        commands = chatglm3_tokenizer.commands
        return "chatglm", chatglm3_tokenizer, [commands["[gMASK]"], commands["sop"]]
    family = request.param.split("_")[-1]
    return family, tiny_tokenizer, [tiny_tokenizer.convert_tokens_to_ids("<s>")]


def training_text(family, rounds, lead=""):
    """The template written out literally (rounds joined by \\n\\n, replies stripped); `lead`:
    text in front of the first round."""
    if family == "llama":
        parts = [f"[INST]{user}[/INST]{reply.strip()}" for user, reply in rounds]
    else:
        parts = [f"[Round {i}]\n\n问：{user}\n\n答：{reply.strip()}" for i, (user, reply) in enumerate(rounds, 1)]
    parts[0] = lead + parts[0]
    return "\n\n".join(parts), parts


def encode_text(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def expected(tokenizer, family, prefix, rounds, empty=(), lead=""):
    """(ids, labels) from the rules in the module docstring; `empty`: indices of masked rounds."""
    text, parts = training_text(family, rounds, lead)
    whole = encode_text(tokenizer, text)
    eos = tokenizer.eos_token_id
    ids = prefix + whole + [eos]
    labels = [X] * len(ids)
    offset = 0
    for index, (part, (_, reply)) in enumerate(zip(parts, rounds)):
        reply_end = offset + len(part)
        reply_start = reply_end - len(reply.strip())
        start, end = (len(encode_text(tokenizer, text[:cut])) for cut in (reply_start, reply_end))
        assert whole[:end] == encode_text(tokenizer, text[:reply_end])  # no merge across the boundary
        if index not in empty:
            labels[len(prefix) + start:len(prefix) + end] = whole[start:end]
            labels[len(prefix) + end] = eos  # the position after the reply: the next text, or EOS
        offset = reply_end + 2  # "\n\n"
    return ids, labels


def encode(tokenizer, family, rounds, system=None):
    [encoded] = ConversationTokenizer(tokenizer, family).encode_batch([rounds], [system])
    return encoded


MULTI_TURN = [("What is the key?", "The key is 42."), ("钥匙在哪里？", "钥匙在桌子上。"),
              ("And the lock?", "It opens.")]  # an odd number of rounds, Chinese in the middle


def test_multi_turn_every_reply_closed_by_eos(case):
    family, tokenizer, prefix = case
    encoded = encode(tokenizer, family, MULTI_TURN)
    assert (encoded.ids, encoded.labels) == expected(tokenizer, family, prefix, MULTI_TURN)
    assert not encoded.differs_from_whole_text and encoded.empty_replies == 0
    eos_targets = [i for i, label in enumerate(encoded.labels) if label == tokenizer.eos_token_id]
    assert len(eos_targets) == 3
    for position in eos_targets[:-1]:  # inputs stay the text: "\n\n" + the next round's prompt
        assert tokenizer.decode([encoded.ids[position]]).startswith("\n")
        assert tokenizer.convert_ids_to_tokens(encoded.ids[position - 1]) != "\u2581"  # no stray "▁"
    assert encoded.ids[eos_targets[-1]] == tokenizer.eos_token_id


@pytest.mark.parametrize("rounds", [[("Only one round", "Fine.")], MULTI_TURN[:2]])
def test_one_and_two_rounds(case, rounds):
    family, tokenizer, prefix = case
    encoded = encode(tokenizer, family, rounds)
    assert (encoded.ids, encoded.labels) == expected(tokenizer, family, prefix, rounds)


def test_empty_whitespace_and_zero_width_replies_are_masked(case):
    family, tokenizer, prefix = case
    rounds = [("q1", ""), ("q2", "  \n "), ("q3", "\u200b\u200c\ufeff"), ("q4", "The key is 42.")]
    encoded = encode(tokenizer, family, rounds)
    assert (encoded.ids, encoded.labels) == expected(tokenizer, family, prefix, rounds, empty={0, 1, 2})
    assert encoded.empty_replies == 3
    assert encoded.labels.count(tokenizer.eos_token_id) == 1  # only the trained reply is closed


def test_all_replies_empty_leaves_no_target(case):
    family, tokenizer, _ = case
    encoded = encode(tokenizer, family, [("q1", " "), ("q2", "")])
    assert set(encoded.labels) == {X} and encoded.empty_replies == 2


def test_control_token_strings_in_content_are_text(case):
    family, tokenizer, prefix = case
    rounds = [(f"Quote: {CONTROL_STRINGS} end", f"It says {CONTROL_STRINGS}."), ("好 sop", "sop </s>")]
    encoded = encode(tokenizer, family, rounds)
    assert (encoded.ids, encoded.labels) == expected(tokenizer, family, prefix, rounds)
    control = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    assert not control & set(encoded.ids[len(prefix):-1])  # no control id anywhere in the text
    text, _ = training_text(family, rounds)
    assert tokenizer.decode(encoded.ids[len(prefix):-1]).strip() == text.strip()
    # the test has teeth: a plain call turns some of these strings into control tokens
    assert control & set(tokenizer(CONTROL_STRINGS, add_special_tokens=False)["input_ids"])


def test_fast_path_and_wrapper_agree_on_control_strings(llama2_tokenizer):
    """The Rust backend route (encode_batch_fast) obeys text-is-text like the wrapper route."""
    encoder = ConversationTokenizer(llama2_tokenizer, "llama")
    assert encoder.encoder.route == "backend_encode_batch_fast"
    texts = [CONTROL_STRINGS, "a</s>b<s>c", "<unk>"]
    fast = encoder.encoder.encode(texts)
    encoder.encoder.backend = None
    assert encoder.encoder.route == "wrapper_split_special_tokens"
    assert encoder.encoder.encode(texts) == fast
    assert fast == [encode_text(llama2_tokenizer, t) for t in texts]


def test_reply_edges_stripped_user_text_kept(case):
    family, tokenizer, prefix = case
    rounds = [("  padded question \n", "\n  The key is 42.  \n\n")]
    encoded = encode(tokenizer, family, rounds)
    assert (encoded.ids, encoded.labels) == expected(tokenizer, family, prefix, rounds)
    text, _ = training_text(family, rounds)
    assert "  padded question \n" in text and text.endswith("The key is 42.")


def test_tokenizer_that_turns_text_into_control_tokens_is_refused(tmp_path):
    tokenizer = build_chatglm3_like_tokenizer(tmp_path, encode_special_tokens=True)
    with pytest.raises(ValueError, match=r"encodes the text '<\|assistant\|>' as control token"):
        ConversationTokenizer(tokenizer, "chatglm")


def test_chatglm3_like_tokenizer_behaves_like_chatglm3(chatglm3_tokenizer):
    """The test double has ChatGLM3's shape: commands after the sentencepiece vocabulary,
    `[gMASK] sop` in front of every encoding, EOS </s> (id 2), pad <unk> (id 0)."""
    commands = chatglm3_tokenizer.commands
    assert list(commands) == list(CHATGLM3_COMMANDS)
    assert min(commands.values()) == chatglm3_tokenizer.sp_model.vocab_size()
    ids = chatglm3_tokenizer("你好")["input_ids"]
    assert ids[:2] == [commands["[gMASK]"], commands["sop"]]
    assert (chatglm3_tokenizer.eos_token_id, chatglm3_tokenizer.pad_token_id) == (2, 0)
    assert not chatglm3_tokenizer.is_fast


def test_no_stray_sentencepiece_prefix_before_the_separator(llama2_tokenizer):
    """Encoded alone, "\\n\\n[INST]..." starts with SentencePiece's dummy "▁" (Llama-2's 29871
    before 13 13); inside the training ids the separator follows the reply directly."""
    alone = llama2_tokenizer.convert_ids_to_tokens(encode_text(llama2_tokenizer, "\n\n[INST]And the lock?[/INST]"))
    assert alone[:3] == ["\u2581", "<0x0A>", "<0x0A>"]
    encoded = encode(llama2_tokenizer, "llama", MULTI_TURN[:2])
    pieces = llama2_tokenizer.convert_ids_to_tokens(encoded.ids)
    separator = pieces.index("<0x0A>")
    assert pieces[separator - 1] == "." and pieces[separator:separator + 3] == ["<0x0A>", "<0x0A>", "["]
    assert "\u2581" not in pieces[separator - 2:separator + 3]


SYSTEM = "You are helpful. 你好 </s> <|user|>"


def test_system_prompt_is_prompt_text_in_the_family_format(case):
    """llama: the <<SYS>> block inside the first [INST]; chatglm: the <|system|> token id after the
    prefix, then "\\n" + the system text before [Round 1]. Never a target."""
    family, tokenizer, prefix = case
    if family == "chatglm" and "<|system|>" not in tokenizer.get_vocab():
        with pytest.raises(ValueError, match=r"no '<\|system\|>' token"):
            encode(tokenizer, family, MULTI_TURN, SYSTEM)
        return
    encoded = encode(tokenizer, family, MULTI_TURN, SYSTEM)
    if family == "llama":
        block = [(f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{MULTI_TURN[0][0]}", MULTI_TURN[0][1])] + MULTI_TURN[1:]
        want = expected(tokenizer, family, prefix, block)
    else:
        want = expected(tokenizer, family, prefix + [tokenizer.commands["<|system|>"]], MULTI_TURN, lead=f"\n{SYSTEM}")
    assert (encoded.ids, encoded.labels) == want
    assert encoded.labels.count(tokenizer.eos_token_id) == len(MULTI_TURN)  # replies only
