"""longalign.demo.evaluation: sized held-out examples, the disjointness check, exact-match scoring."""
import json

import pytest
import torch

from longalign.demo.data import write_demo_data
from longalign.demo.evaluation import (RetrievalExample, check_disjoint, evaluate_model, held_out_short_examples,
                                 size_window, held_out_examples, score_examples, training_texts)
from longalign.eval.generation import Candidate, encode_text
from longalign.demo.tiny_model import TinyShape, save_tiny_model

CONTEXT = 300


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_eval") / "raw"
    write_demo_data(out, seed=5, num_long=20, num_short=20, vocab_size=600, long_words=(100, 250))
    return out


@pytest.fixture(scope="module")
def tokenizer(raw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(raw / "tokenizer"))


def test_examples_are_sized_seeded_and_copied_from_their_query(tokenizer):
    examples = held_out_examples(tokenizer, CONTEXT, per_task=4, seed=11)
    assert {e.task for e in examples} == {"needle", "kv", "fact"} and len(examples) == 12
    for e in examples:
        low, high = size_window(CONTEXT)
        assert low <= e.query_tokens <= high == CONTEXT
        assert e.query_tokens == len(encode_text(tokenizer, e.query))
        assert e.answer in e.query  # a retrieval answer is copied from the context
    assert examples == held_out_examples(tokenizer, CONTEXT, per_task=4, seed=11)
    assert examples != held_out_examples(tokenizer, CONTEXT, per_task=4, seed=12)
    with pytest.raises(ValueError, match="unknown tasks"):
        held_out_examples(tokenizer, CONTEXT, 1, 11, tasks=("summary",))


def test_disjointness_is_checked_against_every_training_message(raw, tokenizer):
    examples = held_out_examples(tokenizer, CONTEXT, per_task=3, seed=11)
    texts = training_texts(raw)
    assert len(texts) > 40  # both files, every message
    assert check_disjoint(examples, texts) == {"examples": 9, "training_messages": len(texts), "overlaps": 0}
    with pytest.raises(ValueError, match="1 held-out examples overlap"):
        check_disjoint(examples, texts + [f"some document ... {examples[2].answer} ... more"])
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint(examples, texts + [examples[0].query])


def test_held_out_short_examples_skip_and_count_training_messages(raw, tokenizer):
    texts = training_texts(raw)
    examples, skipped = held_out_short_examples(tokenizer, "few_words", 6, 11, texts)
    assert skipped == 0 and len(examples) == 6 and {e.task for e in examples} == {"short"}
    for e in examples:
        assert e.query == "Copy these words exactly:\n" + e.answer  # few_words: the first round copies
        assert e.query_tokens == len(encode_text(tokenizer, e.query))
    assert examples == held_out_short_examples(tokenizer, "few_words", 6, 11, texts)[0]
    again, skipped = held_out_short_examples(tokenizer, "few_words", 5, 11, texts + [examples[0].answer])
    assert skipped == 1 and again == examples[1:]  # a round seen in training is skipped and counted
    first_ten = [e.answer for e in held_out_short_examples(tokenizer, "few_words", 10, 11, texts)[0]]
    with pytest.raises(ValueError, match="only 0 of 1 held-out short examples"):  # 10 candidates, all seen
        held_out_short_examples(tokenizer, "few_words", 1, 11, texts + first_ten)


class ScriptedCandidate(Candidate):
    """A stand-in for a model under evaluation: replies from a script, settings recorded."""

    def __init__(self, tokenizer, replies: dict):
        self.tokenizer, self.replies, self.settings = tokenizer, replies, []

    def respond(self, query, settings, stop=None):
        self.settings.append(settings)
        return {"response": self.replies[query]}


def test_exact_match_scoring(tokenizer):
    examples = [RetrievalExample("kv", f"table {i} ... key k{i}?", f"k{i}: 1234{i}", 9) for i in range(4)]
    replies = {examples[0].query: examples[0].answer,                  # right
               examples[1].query: f"  {examples[1].answer} ",          # right (whitespace stripped)
               examples[2].query: f"{examples[2].answer} and more",    # a longer reply is wrong
               examples[3].query: "k3: 99999"}                         # wrong value
    candidate = ScriptedCandidate(tokenizer, replies)
    scores = score_examples(candidate, examples)
    assert [r["correct"] for r in scores["examples"]] == [True, True, False, False]
    assert scores["accuracy"] == 0.5 and scores["per_task"]["kv"] == {"correct": 2, "total": 4, "accuracy": 0.5}
    assert all(s.temperature == 0 for s in candidate.settings)  # greedy
    assert [s.max_new_tokens for s in candidate.settings] == [len(encode_text(tokenizer, e.answer)) + 4
                                                             for e in examples]


def test_evaluate_model_end_to_end_on_an_untrained_model(raw, tmp_path):
    save_tiny_model("llama", raw / "tokenizer", tmp_path / "m",
                    TinyShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=512))
    report = evaluate_model(str(tmp_path / "m"), str(raw), context_tokens=CONTEXT, per_task=2)
    assert report["accuracy"] == 0.0 and len(report["examples"]) == 6  # random weights retrieve nothing
    unseen = report["unseen_kind"]  # the held-out needle kind, scored apart
    assert set(unseen["per_task"]) == {"magic"} and len(unseen["examples"]) == 2 and unseen["accuracy"] == 0.0
    assert report["disjoint"]["examples"] == 8
    assert report["seed"] != report["data_seed"] == json.loads((raw / "stats.json").read_text())["seed"]
    assert report["disjoint"]["overlaps"] == 0
    assert report["short"]["mix"] == "base" and len(report["short"]["examples"]) == 20  # the raw data's mix
    assert report["short"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="training data's seed"):
        evaluate_model(str(tmp_path / "m"), str(raw), CONTEXT, 1, seed=report["data_seed"])


def test_teacher_forced_exact_match_is_greedy_exact_match_and_packing_changes_nothing(raw, tmp_path):
    from longalign.demo.evaluation import teacher_forced_scores
    from longalign.eval.generation import LocalModel, encode_prompt, prepare_prompt
    from longalign.modeling.loading import load_training_model

    save_tiny_model("llama", raw / "tokenizer", tmp_path / "m",
                    TinyShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=512))
    local = LocalModel(str(tmp_path / "m"), device="cpu")
    model, tokenizer = local.model, local.tokenizer
    packed_model = load_training_model(tmp_path / "m", dtype=torch.float32).eval()  # the bench scores this one
    queries = [e.query for e in held_out_examples(tokenizer, 240, per_task=2, seed=3)]  # room for a scrambled needle
    rows = []
    for query in queries:  # the reference answer is the model's own 6-token greedy reply
        prompt = encode_prompt(tokenizer, prepare_prompt(query, local.chat_format, tokenizer, None).text)
        x = torch.tensor([prompt])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        reply = out[0, len(prompt):].tolist()
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    wrong = (rows[0][0][:-1] + [(rows[0][0][-1] + 1) % len(tokenizer)],
             rows[0][1][:-1] + [(rows[0][1][-1] + 1) % len(tokenizer)])
    alone = [teacher_forced_scores(packed_model, [row], max_tokens=10_000)[0] for row in rows + [wrong]]
    packed = teacher_forced_scores(packed_model, rows + [wrong], max_tokens=10_000)
    assert [s["exact"] for s in alone] == [True] * len(rows) + [False]
    assert [s["targets"] for s in alone] == [6] * len(rows) + [6]
    one_per_pack = teacher_forced_scores(packed_model, rows + [wrong], max_tokens=len(rows[0][0]) - 1)
    for a, b, c in zip(alone, packed, one_per_pack):  # row 0 exceeds max_tokens and still runs, alone
        assert a["exact"] == b["exact"] == c["exact"] and abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["loss"] - c["loss"]) < 1e-4
