"""Reports of bench/reproduce_mini.py split over processes: seeds chosen per process, one merged table."""
import json

import pytest

import reproduce_mini
import reproduce_mini_report as rr


def _run(seed, data, method, seconds, long_accuracy=0.5):
    return {"seed": seed, "data": data, "method": method, "train_seconds": seconds, "train_tokens": 100,
            "optimizer_steps": 10, "long_accuracy": long_accuracy, "long_loss": 1.0, "unseen_kind_accuracy": 0.0,
            "needle_accuracy": 0.0, "short_loss": 0.4, "short_accuracy": 0.3}


def test_a_later_report_replaces_the_same_run_of_an_earlier_one():
    quantity = {"runs": [_run(0, "full", "pack_weighted", 42.0), _run(0, "0k", "pack_weighted", 30.0)]}
    methods = {"runs": [_run(0, "full", "pack_weighted", 40.0), _run(0, "full", "naive", 120.0)]}
    runs = rr.merge_runs([quantity, methods])
    assert len(runs) == 3
    assert [r["train_seconds"] for r in runs if r["method"] == "pack_weighted" and r["data"] == "full"] == [40.0]
    assert rr.summarize(runs)["speedup_vs_naive"]["pack_weighted"]["mean"] == pytest.approx(3.0)


def test_report_cli_merges_files_and_refuses_a_file_without_runs(tmp_path, capsys):
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(json.dumps({"runs": [_run(s, "full", "naive", 100.0 + s, 0.4) for s in (0, 1)]}))
    b.write_text(json.dumps({"runs": [_run(s, "full", "pack_weighted", 40.0, 0.6) for s in (0, 1)]}))
    merged = rr.main([str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert merged["summary"]["headline"] == {"mini_long_task_exact_match_naive": pytest.approx(0.4),
                                             "mini_long_task_exact_match_full": pytest.approx(0.6),
                                             "mini_long_task_exact_match_pack_weighted": pytest.approx(0.6)}
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == merged["summary"]
    assert "| naive |" in capsys.readouterr().out
    bad.write_text(json.dumps({"summary": {}}))
    with pytest.raises(SystemExit):
        rr.main([str(a), str(bad)])
    assert "bad.json: not a reproduce_mini.py report" in capsys.readouterr().err


def test_first_seed_chooses_the_seeds_and_must_not_be_negative(tmp_path, capsys):
    args = reproduce_mini.parse_args(["--out", str(tmp_path / "r.json"), "--cpu", "--tiny", "--seeds", "2",
                                      "--first_seed", "3"])
    assert (args.first_seed, args.seeds) == (3, 2)
    with pytest.raises(SystemExit):
        reproduce_mini.parse_args(["--out", str(tmp_path / "r.json"), "--cpu", "--tiny", "--first_seed", "-1"])
    assert "--first_seed must be >= 0" in capsys.readouterr().err
