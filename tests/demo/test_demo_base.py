"""The demo's pretrained base: its corpus, its pretraining script, its measures, the shipped copy."""
import json
import random
from pathlib import Path

import pytest
import torch

from longalign.demo import base_eval, corpus
from longalign.demo.base import prepare_model_init
from longalign.demo.pretrain import HELD_OUT_SEED_OFFSET, PretrainConfig, learning_rate, main as pretrain_main
from longalign.demo.tasks import ALL_TASKS, HELD_OUT_TASKS, LONG_TASKS
from longalign.demo.words import FORBIDDEN

REPO = Path(__file__).resolve().parents[2]
SHIPPED_BASE = REPO / "models" / "tiny-base"
TINY_FLAGS = ["--steps", "3", "--batch", "2", "--context", "64", "--hidden", "32", "--heads", "2", "--kv_heads", "2",
              "--intermediate", "64", "--layers", "2", "--vocab", "400", "--eval_examples", "2", "--max_words", "40",
              "--warmup", "1"]


def test_corpus_is_seeded_has_every_kind_and_no_forbidden_word():
    docs = corpus.documents(3, 400, 120)
    assert docs == corpus.documents(3, 400, 120) != corpus.documents(4, 400, 120)
    text = "\n".join(docs).lower()
    assert not [word for word in FORBIDDEN if word in text]
    for kind, make in corpus.DOCUMENTS.items():
        assert make(random.Random(0), 50).strip(), kind


def test_facts_documents_restate_facts_from_earlier_in_the_text():
    for seed in range(30):
        document = corpus.facts_document(random.Random(seed), 80)
        body, recall = document.rsplit("\n", 1)
        restated = recall.split(": ", 1)[1]
        sentences = [s + "." for s in restated.split(". ") if s]
        assert sentences and all(s.rstrip(".") + "." in body for s in sentences)


def test_list_and_nonsense_documents_repeat_their_span():
    for seed in range(30):
        lines = corpus.nonsense_document(random.Random(seed), 60).split("\n")
        assert lines[0] == lines[-1]
        first, *_, last = corpus.list_document(random.Random(seed), 60).split("\n")
        assert first.split(": ", 1)[1] == last.split(": ", 1)[1]


def test_long_tasks_answer_with_a_sentence_of_their_document():
    for name, make in ALL_TASKS.items():
        for seed in range(10):
            query, answer = make(random.Random(seed), 120)
            assert f"\n{answer}\n" in query and query.rstrip().endswith(("?", ":")), name
    assert set(HELD_OUT_TASKS).isdisjoint(LONG_TASKS)


def test_held_out_wording_is_in_no_training_text(tmp_path):
    from longalign.demo.data import write_demo_data
    write_demo_data(tmp_path / "raw", seed=4, num_long=60, num_short=200, vocab_size=600)
    text = "".join((tmp_path / "raw" / name).read_text(encoding="utf-8") for name in ("long.jsonl", "sharegpt.jsonl"))
    assert "special magic number" not in text.lower()
    query, answer = HELD_OUT_TASKS["magic"](random.Random(0), 100)
    assert "special magic number" in answer and "magic" in FORBIDDEN


def test_learning_rate_warms_up_then_decays_to_its_floor():
    config = PretrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] == pytest.approx(0.1, abs=1e-3)


class NextTokenOracle(torch.nn.Module):
    """Logits whose argmax at position t is the input's token t + 1 (and `wrong` at the last)."""

    def __init__(self, vocab: int, wrong_at: int | None = None):
        super().__init__()
        self.vocab, self.wrong_at, self.weight = vocab, wrong_at, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong_at is not None:
            nxt[0, self.wrong_at] = (nxt[0, self.wrong_at] + 1) % self.vocab
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})()


def test_exact_span_scores_the_target_tokens_only():
    prompt, target = [1, 5, 6, 7], [8, 9]
    assert base_eval.exact_span(NextTokenOracle(16), prompt, target)
    assert not base_eval.exact_span(NextTokenOracle(16, wrong_at=4), prompt, target)  # predicts target[1]
    assert base_eval.exact_span(NextTokenOracle(16, wrong_at=2), prompt, target)  # inside the prompt


def test_copy_token_accuracy_counts_second_copy_tokens():
    probes = [([1, 5, 6, 7], [8, 9]), ([1, 2], [3, 4, 5])]
    assert base_eval.copy_token_accuracy(NextTokenOracle(16), probes) == 1.0
    assert base_eval.copy_token_accuracy(NextTokenOracle(16, wrong_at=4), probes) == pytest.approx(4 / 5)
    assert base_eval.copy_token_accuracy(NextTokenOracle(16, wrong_at=0), probes) == 1.0  # inside the prompts


def test_held_out_examples_fit_the_context(tiny_tokenizer):
    for measure, make in base_eval.EXAMPLES.items():
        ids, target = base_eval.fit_words(make, f"7-{measure}", tiny_tokenizer, 256)
        assert len(ids) + len(target) <= 256 and len(ids) > 100 and target


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny-base"
    pretrain_main(["--out", str(out), *TINY_FLAGS])
    return out


def test_pretrain_writes_a_self_describing_base_and_its_card(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = json.loads((tiny_base / "stats.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    assert model.config.max_position_embeddings == 64 and model.config.vocab_size == len(tokenizer)
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["tokens_trained"] == 3 * 2 * 64 and len(stats["loss_log"]) == 1
    card = (tiny_base / "README.md").read_text()
    assert "python -m longalign.demo.pretrain" in card and "--steps 3" in card
    for name, measure in stats["held_out"].items():
        assert f"| {name} | {measure['exact']:.0%} of 2 | 64 |" in card


def test_pretrain_probes_copying_during_training_and_the_card_shows_it(tmp_path):
    stats = pretrain_main(["--out", str(tmp_path / "probed"), *TINY_FLAGS, "--probe_every", "1",
                           "--probe_examples", "2"])
    probes = [entry for entry in stats["loss_log"] if "copy_token_accuracy" in entry]
    assert [entry["step"] for entry in probes] == [1, 2, 3]
    assert all(0.0 <= entry["copy_token_accuracy"] <= 1.0 for entry in probes)
    assert "copy token accuracy on held-out copy examples during training" in (tmp_path / "probed" / "README.md").read_text()


def test_pretrain_is_seeded(tiny_base, tmp_path):
    from safetensors.torch import load_file

    pretrain_main(["--out", str(tmp_path / "again"), *TINY_FLAGS])
    a, b = load_file(str(tiny_base / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_init_is_the_base_with_a_longer_context(tiny_base, tmp_path):
    from safetensors.torch import load_file

    stats = prepare_model_init(tiny_base, tmp_path / "init", 256)
    config = json.loads((tmp_path / "init" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and stats["base_context"] == 64
    a, b = load_file(str(tiny_base / "model.safetensors")), load_file(str(tmp_path / "init" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="below the base's context 64"):
        prepare_model_init(tiny_base, tmp_path / "short", 32)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--hidden", "30", "--heads", "4"], ["--lr", "-1"]])
def test_pretrain_refuses_bad_settings(bad, tmp_path):
    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(tmp_path / "x"), *TINY_FLAGS, *bad])
    assert not (tmp_path / "x").exists()


def test_document_mix_is_parsed_into_shares_and_bad_mixes_are_refused(tmp_path):
    assert corpus.parse_mix("nonsense:3,lists:1") == {"nonsense": 0.75, "lists": 0.25}
    for bad in ("poems:1", "lists:-1", "lists:0", ""):
        with pytest.raises(ValueError):
            corpus.parse_mix(bad)
    docs = corpus.documents(0, 50, 60, {"nonsense": 1.0})
    assert all(doc.split("\n")[0] == doc.split("\n")[-1] for doc in docs)  # only nonsense documents
    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(tmp_path / "x"), *TINY_FLAGS, "--mix", "poems:1"])


def test_repeats_and_soup_documents_say_one_span_again_and_again():
    for seed in range(20):
        lines = corpus.repeats_document(random.Random(seed), 60).split("\n")
        spans = {line.split(": ", 1)[1] for line in lines}
        assert len(lines) >= 2 and len(spans) == 1
    pieces = ["ab", " cd", "é", "7"]
    for document in corpus.soup_documents(3, 20, pieces):
        spans = {line.split(": ", 1)[1] for line in document.split("\n")}
        assert len(spans) == 1 and set("".join(spans)) <= set("abcdé7 ")
    assert corpus.soup_documents(3, 20, pieces) == corpus.soup_documents(3, 20, pieces)


def test_small_soup_alphabets_repeat_pieces_inside_a_span():
    pieces = [f"<{i}>" for i in range(400)]
    whole = corpus.soup_documents(5, 200, pieces)
    small = corpus.soup_documents(5, 200, pieces, smallest_alphabet=2)
    def distinct_share(document):
        span = document.split("\n")[0].split(": ", 1)[1]
        drawn = span.replace("><", "> <").split()
        return len(set(drawn)) / len(drawn)
    assert sum(map(distinct_share, small)) < 0.8 * sum(map(distinct_share, whole))
    assert any(distinct_share(d) <= 0.5 for d in small)


def test_vocabulary_pieces_are_whole_characters_of_non_special_entries(tiny_tokenizer):
    pieces = corpus.vocabulary_pieces(tiny_tokenizer)
    assert pieces and all("\ufffd" not in p and "\n" not in p and p.strip() for p in pieces)
    assert not set(pieces) & set(tiny_tokenizer.all_special_tokens)


def test_phase_batches_keep_the_tokens_of_a_step():
    from longalign.demo.pretrain import phase_batches
    assert phase_batches(PretrainConfig(context=256, batch=4, steps=300)) == [(256, 4, 300)]
    assert phase_batches(PretrainConfig(context=256, batch=4, steps=300, short_context=64, short_steps=100)) == [
        (64, 16, 100), (256, 4, 300)]


def test_pretrain_short_phase_and_soup_are_trained_and_recorded(tmp_path):
    stats = pretrain_main(["--out", str(tmp_path / "b"), *TINY_FLAGS, "--short_context", "32", "--short_steps", "1",
                           "--soup", "0.3", "--soup_alphabet", "3"])
    assert set(stats["windows"]) == {"32", "64"} and stats["soup_documents"] > 0
    assert stats["tokens_trained"] == 1 * 4 * 32 + 2 * 2 * 64
    card = (tmp_path / "b" / "README.md").read_text()
    assert "the first 1 steps at 32 tokens" in card and "token-soup documents" in card
    assert "each span from an alphabet of 3 to" in card


@pytest.mark.parametrize("bad", [["--short_context", "64", "--short_steps", "1"],
                                 ["--short_context", "32", "--short_steps", "4"], ["--soup", "1"]])
def test_pretrain_refuses_bad_phases_and_soup(bad, tmp_path):
    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(tmp_path / "x"), *TINY_FLAGS, *bad])
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not (SHIPPED_BASE / "config.json").is_file(), reason="no base shipped in models/tiny-base")
def test_shipped_base_loads_alone_and_copies_as_its_card_says():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED_BASE)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_BASE))
    stats = json.loads((SHIPPED_BASE / "stats.json").read_text())
    card = (SHIPPED_BASE / "README.md").read_text()
    seed, context = stats["config"]["seed"] + HELD_OUT_SEED_OFFSET, stats["config"]["context"]
    for measure in ("copy", "recall"):
        claimed = stats["held_out"][measure]["exact"]
        assert f"| {measure} | {claimed:.0%} of" in card and claimed >= 0.8
        hits = [base_eval.exact_span(model, *base_eval.fit_words(base_eval.EXAMPLES[measure], f"{seed}-{measure}-{i}",
                                                                  tokenizer, context)) for i in range(10)]
        assert sum(hits) >= 7, (measure, hits)  # the card's examples 0-9 (its figure is over 100)


def test_scrambled_needles_keep_the_form_and_swap_some_words_for_nonsense(monkeypatch):
    from longalign.demo import tasks
    text = " ".join(f"word{i}" for i in range(200))
    out = tasks.scrambled(random.Random(0), text).split()
    assert len(out) == 200 and 0.25 < sum(a != b for a, b in zip(out, text.split())) / 200 < 0.55
    answers = {}
    for share in (0.0, 1.0):
        monkeypatch.setattr(tasks, "SCRAMBLED_NEEDLES", share)
        answers[share] = [tasks.needle_retrieval(random.Random(seed), 30)[1] for seed in range(50)]
    for plain, odd in zip(answers[0.0], answers[1.0]):
        assert plain.startswith("The best thing to do in ") and len(plain.split()) == len(odd.split())
    assert sum(p != o for p, o in zip(answers[0.0], answers[1.0])) >= 45  # nearly every needle scrambled
