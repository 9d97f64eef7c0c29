"""bench/demo_sweep.py: a CPU config end to end (lines written as it goes) and a failed config recorded."""
import json

import pytest

import demo_sweep as sweep

TINY = {"device": "cpu", "num_long": 6, "num_short": 12, "long_words": [20, 60], "vocab": 400, "hidden": 32,
        "intermediate": 64, "tokens": 4000, "max_tokens": 512, "eval_every": 2, "context": 200,
        "eval_per_task": 1, "threads": 1}


def test_cpu_config_trains_and_scores_every_set(tmp_path, capsys):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{**TINY, "name": "tiny", "mix": "copy2"}]))
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--configs", str(configs), "--out", str(out), "--parallel", "1"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and [d["step"] for d in lines] == sorted(d["step"] for d in lines)
    last = lines[-1]
    assert last["step"] == last["steps"] and last["tokens"] <= last["steps"] * TINY["max_tokens"]
    for key in ("needle", "kv", "sf_needle", "short"):
        assert 0 <= last[key]["exact"] <= 1 and last[key]["loss"] > 0
    assert "1 of 1 configs ran" in capsys.readouterr().out


def test_a_failing_config_is_recorded_and_fails_the_sweep(tmp_path):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{**TINY, "name": "bad", "mix": "no such mix"}]))
    out = tmp_path / "sweep.jsonl"
    with pytest.raises(SystemExit):
        sweep.main(["--configs", str(configs), "--out", str(out), "--parallel", "1"])
    (line,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert line["name"] == "bad" and "KeyError" in line["error"]
