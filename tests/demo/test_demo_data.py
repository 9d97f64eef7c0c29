"""The embedded default data: seeded, valid, answers copied from the context, loadable tokenizer."""
import json
import random

from longalign.data.conversations import Conversation, read_jsonl
from longalign.demo.tasks import LONG_TASKS, NEEDLE_QUESTION
from longalign.demo.data import generate_haystack, generate_long, generate_short, write_demo_data

# The needle test's own needle (Needle_test/demo.sh): never part of the training text.
NEEDLE_TEST_WORDS = ("San Francisco", "sandwich", "Dolores", "sunny")


def test_generation_is_deterministic():
    assert generate_long(random.Random(7), 9) == generate_long(random.Random(7), 9)
    assert generate_short(random.Random(7), 20) == generate_short(random.Random(7), 20)
    assert generate_long(random.Random(7), 9) != generate_long(random.Random(8), 9)
    assert generate_haystack(1) == generate_haystack(1) != generate_haystack(2)


def test_every_long_answer_is_copied_from_a_long_context():
    rows = generate_long(random.Random(0), 30, words_range=(150, 400))
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert answer in question and len(answer.split()) < 30  # short answer, copied
        assert len(question) >= 400  # long context (150 filler words or their tokens in a table)
    needles = [r for r in rows if r["messages"][1]["content"].startswith("The best thing to do in ")]
    assert 0 < len(needles) < len(rows)  # every task, in turn
    for row in needles:  # the question has the needle test's form
        assert row["messages"][0]["content"].endswith(NEEDLE_QUESTION.split("{place}")[1])


def test_long_inputs_short_answers_short_inputs_long_answers():
    long_rows, short_rows = generate_long(random.Random(1), 40), generate_short(random.Random(1), 200)

    def mean_chars(rows, role):
        return sum(len(m["content"]) for r in rows for m in r["messages"] if m["role"] == role) / len(rows)

    assert mean_chars(long_rows, "user") > 20 * mean_chars(long_rows, "assistant")  # few targets per token
    assert mean_chars(short_rows, "assistant") > 1.5 * mean_chars(short_rows, "user")  # many targets per token
    assert mean_chars(short_rows, "assistant") > 2 * mean_chars(long_rows, "assistant")  # more per sequence
    assert mean_chars(long_rows, "user") > 20 * mean_chars(short_rows, "user")


def test_needle_test_needle_never_in_training_text(tmp_path):
    write_demo_data(tmp_path / "raw", seed=4, num_long=60, num_short=200, vocab_size=600)
    text = "".join((tmp_path / "raw" / name).read_text(encoding="utf-8") for name in ("long.jsonl", "sharegpt.jsonl"))
    text += "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "raw" / "haystack").glob("*.txt"))
    assert not [w for w in NEEDLE_TEST_WORDS if w.lower() in text.lower()]


def test_write_demo_data_outputs(tmp_path):
    from transformers import AutoTokenizer

    stats = write_demo_data(tmp_path / "raw", seed=3, num_long=6, num_short=40, vocab_size=600)
    for name, count in (("long.jsonl", 6), ("sharegpt.jsonl", 40)):
        rows = read_jsonl(tmp_path / "raw" / name).rows
        assert len(rows) == count and all(isinstance(r, Conversation) for r in rows)
    assert stats["short_multi_turn"] > 0 and stats["haystack_files"] == len(list((tmp_path / "raw" / "haystack").glob("*.txt")))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "raw" / "tokenizer"))
    text = "[Round 1]\n\n问：你好\n\n答：hello"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    assert json.loads((tmp_path / "raw" / "stats.json").read_text()) == stats
    assert set(LONG_TASKS) == {"needle", "kv", "fact"}


def test_copy_topics_answer_with_the_text_they_were_given():
    from longalign.demo.data import _copy_words, _repeat_passage
    for seed in range(20):
        words_rounds, passage_rounds = _copy_words(random.Random(seed)), _repeat_passage(random.Random(seed))
        question, answer = words_rounds[0]
        assert question.endswith("\n" + answer) and words_rounds[1][1] == answer
        assert len(set(answer.split())) == len(answer.split()) >= 8  # distinct words: a copy, not a pattern
        assert words_rounds[2][1] == f"That was {len(answer.split())} words."
        question, answer = passage_rounds[0]
        assert question.endswith("\n" + answer) and answer.startswith(passage_rounds[1][1][:-1])
        assert not any(word in answer for word in NEEDLE_TEST_WORDS)


def test_short_mixes_cycle_their_topics_and_base_is_the_default():
    from longalign.demo.data import SHORT_MIXES, SHORT_TOPICS, _copy_words
    assert SHORT_MIXES["base"] is SHORT_TOPICS
    assert generate_short(random.Random(3), 30) == generate_short(random.Random(3), 30, SHORT_TOPICS)
    only = generate_short(random.Random(3), 12, SHORT_MIXES["only_words"])
    assert all(row["messages"][0]["content"].startswith("Copy these words exactly:\n") for row in only)
    for name, topics in SHORT_MIXES.items():
        assert topics and all(callable(t) for t in topics), name
        for row in generate_short(random.Random(0), 2 * len(topics), topics):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, name
            assert all(m["content"].strip() for m in row["messages"]), name
    assert _copy_words in SHORT_MIXES["copy2"]


def test_copy_few_words_and_items_copy_what_they_were_given():
    from longalign.demo.data import _copy_few_words, _copy_items, _copy_marked_words
    for seed in range(20):
        for topic, fewest in ((_copy_few_words, 4), (_copy_items, 4)):
            rounds = topic(random.Random(seed))
            question, answer = rounds[0]
            assert question == "Copy these words exactly:\n" + answer and rounds[1][1] == answer
            assert 16 >= len(answer.split()) >= fewest
            assert rounds[2][1] == f"That was {len(answer.split())} words."
            assert not any(word.lower() in answer.lower() for word in NEEDLE_TEST_WORDS)
        question, answer = _copy_marked_words(random.Random(seed))[0]
        assert f"\nWords: {answer}\n" in question and question.endswith("\nCopy the words exactly.")
        assert len(set(_copy_few_words(random.Random(seed))[0][1].split())) == len(
            _copy_few_words(random.Random(seed))[0][1].split())  # distinct words


def test_write_demo_data_takes_a_short_mix(tmp_path):
    import pytest

    stats = write_demo_data(tmp_path / "raw", seed=3, num_long=2, num_short=10, vocab_size=400, mix="few_words")
    rows = read_jsonl(tmp_path / "raw" / "sharegpt.jsonl").rows
    assert stats["short_mix"] == "few_words" and len(rows) == 10
    assert all(r.rounds[0][0].startswith("Copy these words exactly:\n") for r in rows)
    with pytest.raises(ValueError, match="unknown short-task mix"):
        write_demo_data(tmp_path / "raw2", seed=3, num_long=1, num_short=1, vocab_size=400, mix="nope")
    assert not (tmp_path / "raw2").exists()


def test_observed_alphabet_tokenizer_has_only_the_bytes_it_saw(tmp_path):
    import pytest

    from longalign.demo.tiny_tokenizer import train_tiny_tokenizer
    texts = ["the quiet river and the green garden"] * 50
    full = train_tiny_tokenizer(texts, tmp_path / "bytes", vocab_size=300)
    seen = train_tiny_tokenizer(texts, tmp_path / "observed", vocab_size=300, alphabet="observed")
    assert len(full) > 256 > len(seen)  # no ids for bytes the corpus never had
    ids = seen("the river", add_special_tokens=False)["input_ids"]
    assert seen.decode(ids) == "the river" and seen.unk_token_id not in ids
    assert seen.unk_token_id in seen("the zebra", add_special_tokens=False)["input_ids"]  # z, b: never seen
    with pytest.raises(ValueError, match="alphabet must be one of"):
        train_tiny_tokenizer(texts, tmp_path / "x", alphabet="latin")


def test_demo_data_takes_the_tokenizer_of_a_model(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    stats = write_demo_data(tmp_path / "raw", seed=3, num_long=2, num_short=4, tokenizer_from=tiny_tokenizer_dir)
    copied = AutoTokenizer.from_pretrained(str(tmp_path / "raw" / "tokenizer"))
    assert stats["vocab_size"] == len(copied) == len(tiny_tokenizer) and stats["tokenizer_from"] == tiny_tokenizer_dir
    text = "The access code of Kalomir is 51234."
    assert copied(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
