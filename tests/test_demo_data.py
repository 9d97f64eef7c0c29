"""The embedded default data: seeded, valid, answer copied from the context, loadable tokenizer."""
import json
import random
import re

from longalign.conversations import Conversation, read_jsonl
from longalign.demo_data import generate_long, generate_short, write_demo_data


def test_generation_is_deterministic():
    assert generate_long(random.Random(7), 9) == generate_long(random.Random(7), 9)
    assert generate_short(random.Random(7), 20) == generate_short(random.Random(7), 20)
    assert generate_long(random.Random(7), 9) != generate_long(random.Random(8), 9)


def test_every_long_answer_is_copied_from_the_context():
    for row in generate_long(random.Random(0), 30):
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        codes = re.findall(r"\d{5}", answer)
        assert codes and all(code in question for code in codes)
        assert len(question.split()) >= 100  # long context, not a one-liner


def test_write_demo_data_outputs(tmp_path):
    from transformers import AutoTokenizer

    stats = write_demo_data(tmp_path / "raw", seed=3, num_long=6, num_short=40, vocab_size=600)
    for name, count in (("long.jsonl", 6), ("sharegpt.jsonl", 40)):
        rows = read_jsonl(tmp_path / "raw" / name).rows
        assert len(rows) == count and all(isinstance(r, Conversation) for r in rows)
    assert stats["short_multi_turn"] > 0
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "raw" / "tokenizer"))
    text = "[Round 1]\n\n问：你好\n\n答：hello"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    assert json.loads((tmp_path / "raw" / "stats.json").read_text()) == stats
