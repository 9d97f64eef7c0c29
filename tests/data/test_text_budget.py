"""Memory per row is bounded by --max_length: an over-long conversation is cut to a text budget
before tokenizing (longalign.data.text_budget), and the ids and labels kept are those of the whole text."""
import random

import pytest
from transformers import AutoTokenizer

from longalign.data import text_budget
from longalign.data.tokenize_stage import run_pretokenize
from longalign.data.text_encoder import TextEncoder
from longalign.data.tokenization import ConversationTokenizer, encode_within_budget, finish_example
from helpers.pretokenize_inputs import make_config, messages
from helpers.tokenizer_builders import build_chatglm3_like_tokenizer, build_llama2_sentencepiece_dir

MAX_LENGTH = 64
WORDS = ("The quick brown fox jumps over the lazy dog. key 42, lock; 钥匙在桌子上。 Long context models read "
         "documents [INST] </s> <|user|> \n\n").split(" ")


def text(chars: int, seed: int) -> str:
    rng, out, length = random.Random(seed), [], 0
    while length < chars:
        out.append(rng.choice(WORDS) + rng.choice(" \n"))
        length += len(out[-1])
    return "".join(out).strip()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tiny_tokenizer):
    llama2 = AutoTokenizer.from_pretrained(build_llama2_sentencepiece_dir(tmp_path_factory.mktemp("sp")))
    chatglm3 = build_chatglm3_like_tokenizer(tmp_path_factory.mktemp("glm"))
    return {"byte_level_llama": ("llama", tiny_tokenizer), "byte_level_chatglm": ("chatglm", tiny_tokenizer),
            "llama2": ("llama", llama2), "chatglm3_like": ("chatglm", chatglm3)}


SHAPES = {  # (system, rounds): where the over-long text is
    "long_reply": (None, [("Summarize.", text(6000, 1))]),
    "long_prompt": (None, [(text(6000, 2), "Short answer."), ("And?", "Done.")]),
    "long_middle": (None, [("q1", "a1"), (text(3000, 3), text(3000, 4)), ("q3", text(200, 5))]),
    "many_rounds": (None, [(text(300, 10 + i), text(300, 40 + i)) for i in range(20)]),
    "long_system": (text(6000, 6), [("q", "a"), ("q2", "a2")]),
}


def outcome(example):
    ids = None if example.input_ids is None else example.input_ids.tolist()
    labels = None if example.labels is None else example.labels.tolist()
    return example.status, ids, labels, example.num_targets


@pytest.mark.parametrize("mode", ["right", "left", "skip"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", ["byte_level_llama", "byte_level_chatglm", "llama2", "chatglm3_like"])
def test_cut_rows_keep_the_ids_and_labels_of_the_whole_text(tokenizers, case, shape, mode):
    family, tokenizer = tokenizers[case]
    system, rounds = SHAPES[shape]
    if system is not None and family == "chatglm" and case.startswith("byte_level"):
        pytest.skip("the byte-level tokenizer has no <|system|> token")
    encoder = ConversationTokenizer(tokenizer, family)
    [whole] = encoder.encode_batch([rounds], [system])
    [cut] = encode_within_budget(encoder, [rounds], [system], MAX_LENGTH, mode)
    assert cut.cut_chars > 0 and len(cut.ids) < len(whole.ids)  # it was cut ...
    assert outcome(finish_example(cut, MAX_LENGTH, mode)) == outcome(finish_example(whole, MAX_LENGTH, mode))


@pytest.mark.parametrize("mode", ["right", "left"])
def test_a_budget_too_small_for_the_kept_tokens_grows_until_it_holds(tokenizers, monkeypatch, mode):
    """One character per token is too few for this text: the budget doubles until the kept ids
    lie inside the cut text with the safety margin, and they are still those of the whole text."""
    family, tokenizer = tokenizers["llama2"]
    rounds = [("Summarize.", text(20000, 7))]
    encoder = ConversationTokenizer(tokenizer, family)
    [whole] = encoder.encode_batch([rounds])
    monkeypatch.setattr(text_budget, "CHARS_PER_TOKEN_BOUND", 1)
    budgets = []
    real = text_budget.text_budget
    monkeypatch.setattr("longalign.data.tokenization.text_budget", lambda *a: budgets.append(a) or real(*a))
    [cut] = encode_within_budget(encoder, [rounds], [None], MAX_LENGTH, mode)
    scales = [scale for *_, scale in budgets[1:]]  # budgets[0]: the check whether to cut at all
    assert len(scales) >= 2 and scales == [2 ** i for i in range(len(scales))]
    assert 0 < cut.cut_chars
    assert outcome(finish_example(cut, MAX_LENGTH, mode)) == outcome(finish_example(whole, MAX_LENGTH, mode))


def test_an_over_long_row_is_tokenized_within_its_text_budget(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """One 2 MB reply: before, all of it was tokenized (memory grows with the row); now only the
    budget's characters are, counted in stats.json as a cut row."""
    longest = []
    real_encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts, continuation=False: longest.append(
        max(map(len, texts), default=0)) or real_encode(self, texts, continuation))
    huge = text(2_000_000, 8)
    config = make_config(tmp_path, tiny_tokenizer_dir, [messages("Summarize.", huge)], [messages("hi", "hello")],
                         max_length=MAX_LENGTH)
    stats = run_pretokenize(config)
    budget = text_budget.text_budget(MAX_LENGTH, "right")
    assert max(longest) <= 2 * budget.head_chars < len(huge) // 100
    long = stats["sources"]["long"]
    assert (long["rows_cut_before_tokenizing"], long["truncated"], long["kept"]) == (1, 1, 1)
    assert long["chars_cut_before_tokenizing"] >= len(huge) - 2 * budget.head_chars
    assert stats["total"]["rows_cut_before_tokenizing"] == 1


def test_budget_sizes():
    right = text_budget.text_budget(1000, "right")
    assert (right.head_chars, right.tail_chars, right.head_tokens, right.tail_tokens) == (
        8 * 1064, 0, 1064, 0)
    left = text_budget.text_budget(1000, "left", scale=2)
    assert (left.head_chars, left.tail_chars, left.head_tokens, left.tail_tokens) == (
        2 * 8 * 66, 2 * 8 * 1062, 66, 1062)
