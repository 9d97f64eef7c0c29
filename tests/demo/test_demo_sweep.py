"""bench/demo_sweep.py: a CPU config end to end (lines written as it goes) and a failed config recorded."""
import json

import pytest

import demo_sweep as sweep

TINY = {"device": "cpu", "num_long": 6, "num_short": 12, "long_words": [20, 60], "vocab": 400, "hidden": 32,
        "intermediate": 64, "tokens": 4000, "max_tokens": 512, "eval_every": 4, "context": 200,
        "eval_per_task": 1, "threads": 1}  # 8 steps, scored twice (each scoring: ~0.5 s of needle prompts)


def test_cpu_config_trains_and_scores_every_set(tmp_path, capsys):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{**TINY, "name": "tiny", "mix": "copy2"}]))
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--configs", str(configs), "--out", str(out), "--parallel", "1"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) > 1 and [d["step"] for d in lines] == sorted(d["step"] for d in lines)
    last = lines[-1]
    assert last["step"] == last["steps"] and last["tokens"] <= last["steps"] * TINY["max_tokens"]
    for key in ("needle", "kv", "fact", "sf_needle", "short"):
        assert 0 <= last[key]["exact"] <= 1 and last[key]["loss"] > 0
    disjoint = last["disjoint"]  # 3 retrieval examples (one per task) + 20 San Francisco prompts, none in training
    assert disjoint["examples"] == 23 and disjoint["overlaps"] == 0
    assert 0 <= disjoint["short_seen_in_training"] <= sweep.EVAL_SHORT_CHATS
    assert "1 of 1 configs ran" in capsys.readouterr().out


def test_held_out_retrieval_overlapping_training_is_an_error(tmp_path):
    from longalign.demo.evaluation import held_out_examples, held_out_seed
    from longalign.data.tokenization import ConversationTokenizer
    cfg = {**sweep.DEFAULTS, **TINY}
    tok, long_rows, short_rows = sweep.make_data(cfg, tmp_path / "tok")
    texts = [m["content"] for row in long_rows + short_rows for m in row["messages"]]
    enc = ConversationTokenizer(tok, "llama")
    _, clean = sweep.eval_sets(cfg, tok, enc, texts)
    assert clean["overlaps"] == 0
    [first, *_] = held_out_examples(tok, cfg["context"], cfg["eval_per_task"], held_out_seed(cfg["data_seed"]))
    with pytest.raises(ValueError, match="overlap the training data"):
        sweep.eval_sets(cfg, tok, enc, texts + [f"a document quoting {first.answer} in training"])
    with pytest.raises(ValueError, match="overlap the training data"):
        sweep.eval_sets(cfg, tok, enc, texts + [sweep.needle_and_question()[0].strip()])


def test_a_failing_config_is_recorded_and_fails_the_sweep(tmp_path):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{**TINY, "name": "bad", "mix": "no such mix"}]))
    out = tmp_path / "sweep.jsonl"
    with pytest.raises(SystemExit):
        sweep.main(["--configs", str(configs), "--out", str(out), "--parallel", "1"])
    (line,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert line["name"] == "bad" and "KeyError" in line["error"]
