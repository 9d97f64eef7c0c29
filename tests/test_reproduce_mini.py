"""bench/reproduce_mini.py: the CPU smoke run end to end, and the direction verdicts from numbers."""
import json

import reproduce_mini as rm


def test_cpu_tiny_smoke_run(tmp_path, capsys):
    out = tmp_path / "report.json"
    report = rm.main(["--cpu", "--tiny", "--seeds", "2", "--out", str(out), "--workdir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    assert saved["summary"] == report["summary"] and len(saved["runs"]) == 2 * len(rm.METHODS)
    assert {r["method"] for r in saved["runs"]} == set(rm.METHODS) and {r["seed"] for r in saved["runs"]} == {0, 1}
    for run in saved["runs"]:
        assert run["train_seconds"] > 0 and run["optimizer_steps"] > 0
        assert 0 <= run["long_accuracy"] <= 1 and run["short_loss"] > 0
    assert all(d["overlaps"] == 0 for d in saved["eval"]["disjoint"].values())
    grouping = saved["grouping"]["0"]
    assert grouping["sort_padding_fraction"] <= grouping["unsorted_padding_fraction"]
    table = capsys.readouterr().out
    for figure in ("45.4", "19.1", "20.5", "5.76", "6.21"):  # the paper's, beside ours
        assert figure in table
    assert table.count("(paper: ") == len(rm.DIRECTIONS)


def run(method, seed, **metrics):
    return {"method": method, "seed": seed, "train_seconds": 1.0, "long_accuracy": 0.0, "short_loss": 1.0,
            "short_accuracy": 0.0, **metrics}


def test_direction_verdicts_are_computed_from_the_seeds():
    faster = [run("naive", s, train_seconds=10.0) for s in range(3)] + [run("sort", s, train_seconds=4.0)
                                                                         for s in range(3)]
    verdict = rm.direction(faster, *rm.DIRECTIONS[0])
    assert verdict["verdict"] == "reproduced" and verdict["seeds_in_direction"] == 3
    assert verdict["gain"]["mean"] == 6.0  # seconds saved
    mixed = [run("pack", s, long_accuracy=0.5) for s in range(3)] + [
        run("pack_weighted", s, long_accuracy=a) for s, a in enumerate((0.7, 0.4, 0.6))]
    assert rm.direction(mixed, *rm.DIRECTIONS[2])["verdict"] == "mixed"
    tie = [run("pack", s, long_accuracy=0.5) for s in range(2)] + [run("pack_weighted", s, long_accuracy=0.5)
                                                                  for s in range(2)]
    assert rm.direction(tie, *rm.DIRECTIONS[2])["verdict"] == "tie"  # equal is not the paper's direction
    worse = tie[:2] + [run("pack_weighted", 0, long_accuracy=0.5), run("pack_weighted", 1, long_accuracy=0.2)]
    assert rm.direction(worse, *rm.DIRECTIONS[2])["verdict"] == "not reproduced"
    assert rm.direction(tie, *rm.DIRECTIONS[0])["verdict"] == "not measured"
    assert rm.direction(tie, *rm.DIRECTIONS[3])["verdict"] == "not measured"  # runs without long_loss
