"""Issue 15, data stages: pre_tokenize.py and sort_and_group.py driven as a careless user, or a kill,
would drive them. Each test is named after the issue's numbered defect it reproduces and checks the
user-visible outcome: exit code, message, files on disk. Kills are real SIGKILLs sent from outside
while the stage waits at a named fault point (longalign/fault_points.py)."""
import json
import shutil

import datasets
import pytest

from helpers.faults_support import (REPO, kill_at, messages, no_write_permission_prefix, run_cli, snapshot,
                            write_jsonl)
from longalign import fault_points
from longalign.json_files import BrokenJsonFileError
from longalign.storage import OUTPUT_MARKER, clean_leftovers
from longalign.data.validation import DatasetValidationError, check_sort_pack_pair

LONG = [messages(f"Question {i}: what is the key?", f"The key is {i}.") for i in range(4)]
SHORT = [messages(f"hi {i}", f"hello {i}") for i in range(3)]
PROGRESS = "pre_tokenize:"  # the tokenization progress bar: absent when a check stops the run first


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    return {"long": write_jsonl(folder / "long.jsonl", LONG), "short": write_jsonl(folder / "short.jsonl", SHORT)}


def pre_tokenize(tokenizer, raw, out, *extra, **kwargs):
    return run_cli([REPO / "pre_tokenize.py", "--model", "llama", "--tokenizer", tokenizer, "--long", raw["long"],
                    "--short", raw["short"], "--num_proc", "1", "--max_length", "512", "--output_dir", out, *extra],
                   **kwargs)


def sort_and_group(train_file, *extra, **kwargs):
    return run_cli([REPO / "sort_and_group.py", "--train_file", train_file, "--max_length", "512", *extra], **kwargs)


def stats_of(folder):
    return json.loads((folder / "stats.json").read_text())


def leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A pre_tokenize output of LONG + SHORT (7 rows), built once; tests copy it."""
    root = tmp_path_factory.mktemp("dataset")
    raw = {"long": write_jsonl(root / "long.jsonl", LONG), "short": write_jsonl(root / "short.jsonl", SHORT)}
    done = pre_tokenize(tiny_tokenizer_dir, raw, root / "data")
    assert done.returncode == 0, done.stderr
    return root / "data"


# ---- 1. --output_dir replaced whatever was there -------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_output_dir_holding_the_inputs_is_refused_and_nothing_is_deleted(tmp_path, tiny_tokenizer_dir, raw,
                                                                           overwrite):
    before = snapshot(tmp_path / "raw")
    done = pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "raw", *overwrite)
    assert done.returncode != 0 and "holds the input" in done.stderr
    assert snapshot(tmp_path / "raw") == before


@pytest.mark.subprocess
@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_an_unrelated_folder_or_a_regular_file_is_never_replaced(tmp_path, tiny_tokenizer_dir, raw, overwrite):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    regular = tmp_path / "model.bin"
    regular.write_bytes(b"weights")
    for target, message in ((unrelated, "not an output of pre_tokenize"), (regular, "is an existing file")):
        before = snapshot(target)
        done = pre_tokenize(tiny_tokenizer_dir, raw, target, *overwrite)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
        assert PROGRESS not in done.stderr  # refused before any tokenization
        assert snapshot(target) == before


@pytest.mark.subprocess
def test_a_previous_output_is_replaced_but_not_what_was_put_in_it(tmp_path, tiny_tokenizer_dir, raw, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    assert sort_and_group(out, "--group_size", "1").returncode == 0  # sort/, pack/ inside the dataset
    write_jsonl(raw["long"], LONG[:1])
    done = pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert done.returncode != 0 and "pack, sort" in done.stderr and "--overwrite_output_dir" in done.stderr
    assert (out / "sort").is_dir() and datasets.load_from_disk(str(out)).num_rows == 7
    done = pre_tokenize(tiny_tokenizer_dir, raw, out, "--overwrite_output_dir")
    assert done.returncode == 0, done.stderr
    assert not (out / "sort").exists() and datasets.load_from_disk(str(out)).num_rows == 4
    done = pre_tokenize(tiny_tokenizer_dir, raw, out)  # its own output, nothing else in it: replaced
    assert done.returncode == 0, done.stderr


@pytest.mark.subprocess
def test_sort_and_group_never_replaces_a_file_at_sort_or_pack(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    (out / "pack").write_text("not a dataset")
    done = sort_and_group(out, "--group_size", "1", "--overwrite_output_dir")
    assert done.returncode != 0 and "is an existing file" in done.stderr
    assert (out / "pack").read_text() == "not a dataset" and not (out / "sort").exists()


# ---- 2. remote code without an opt-in ----------------------------------------------------------------
REMOTE_CODE = '''import os, pathlib
pathlib.Path(os.environ["REMOTE_CODE_RAN"]).write_text("ran")
from transformers import PreTrainedTokenizerFast


class CustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def tokenizer_with_code(tokenizer_dir, folder):
    """A copy of the tiny tokenizer whose tokenizer_config.json names a class in its own .py file,
    as ChatGLM3's does; that file writes $REMOTE_CODE_RAN when it is imported."""
    shutil.copytree(tokenizer_dir, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(auto_map={"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizerFast"]},
                  tokenizer_class="CustomTokenizerFast")
    config_file.write_text(json.dumps(config))
    (folder / "custom_tokenizer.py").write_text(REMOTE_CODE)
    return folder


@pytest.mark.subprocess
def test_tokenizer_code_runs_only_with_trust_remote_code(tmp_path, tiny_tokenizer_dir, raw):
    tokenizer = tokenizer_with_code(tiny_tokenizer_dir, tmp_path / "custom")
    ran, out = tmp_path / "ran", tmp_path / "out"
    env = {"REMOTE_CODE_RAN": str(ran), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = pre_tokenize(tokenizer, raw, out, **env)
    assert done.returncode != 0 and "--trust_remote_code" in done.stderr and "auto_map" in done.stderr
    assert not ran.exists() and not out.exists()
    done = pre_tokenize(tokenizer, raw, out, "--trust_remote_code", **env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ran.read_text() == "ran" and datasets.load_from_disk(str(out)).num_rows == 7


# ---- 3. one bad row stopped the run -----------------------------------------------------------------
SURROGATE_ROWS = [json.dumps(LONG[0]),
                  '{"messages": [{"role": "user", "content": "a lone \\ud800 surrogate"}, '
                  '{"role": "assistant", "content": "ok"}]}',
                  json.dumps(LONG[1]),
                  '{"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "x\\udfff"}]}',
                  '{"messages": [{"role": "user", "content": "a pair \\ud83d\\ude00 is fine"}, '
                  '{"role": "assistant", "content": "yes"}]}']


@pytest.mark.subprocess
def test_lone_surrogate_rows_are_counted_with_file_and_line(tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], SURROGATE_ROWS)
    out = tmp_path / "out"
    done = pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 invalid input rows skipped" in done.stderr
    long = stats_of(out)["sources"]["long"]
    assert long["skipped_invalid_by_kind"] == {"lone_surrogate": 2} and long["kept"] == 3
    report = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert [(r["origin"], r["line"], r["kind"]) for r in report] == [
        (str(raw["long"]), 2, "lone_surrogate"), (str(raw["long"]), 4, "lone_surrogate")]


@pytest.mark.subprocess
def test_strict_stops_at_the_lone_surrogate_naming_file_and_line(tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], SURROGATE_ROWS)
    done = pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "out", "--strict")
    assert done.returncode != 0 and f"{raw['long']}:2: invalid row (lone_surrogate)" in done.stderr
    assert not (tmp_path / "out").exists()


# ---- 6. outputs the next stage cannot read ----------------------------------------------------------
@pytest.mark.subprocess
def test_empty_input_exits_nonzero_and_writes_nothing(tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], [])
    write_jsonl(raw["short"], [])
    done = pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "out")
    assert done.returncode != 0 and "no example to write" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_max_length_shorter_than_the_template_is_refused_before_tokenizing(tmp_path, tiny_tokenizer_dir, raw):
    done = pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "out", "--max_length", "3")
    assert done.returncode != 0 and "shorter than the llama chat template" in done.stderr
    assert PROGRESS not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_sort_and_group_on_an_empty_dataset_is_a_clear_error(tmp_path):
    feature = datasets.List(datasets.Value("int32"))
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"input_ids": [], "labels": []},
                               features=datasets.Features({"input_ids": feature, "labels": feature})
                               ).save_to_disk(str(empty))
    done = sort_and_group(empty, "--group_size", "1")
    assert done.returncode != 0 and "has no rows" in done.stderr and "IndexError" not in done.stderr
    assert not (empty / "sort").exists() and not (empty / "pack").exists()


# ---- 8. group_size above the dataset; sort/ and pack/ from different runs -------------------------------
@pytest.mark.subprocess
def test_group_size_larger_than_the_dataset_is_an_error_unless_asked(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    done = sort_and_group(out, "--group_size", "100")
    assert done.returncode != 0 and "larger than the dataset's 7 sequences" in done.stderr
    assert "--repeat_small_dataset" in done.stderr and not (out / "sort").exists() and not (out / "pack").exists()
    done = sort_and_group(out, "--group_size", "100", "--repeat_small_dataset")
    assert done.returncode == 0, done.stderr
    assert stats_of(out / "sort")["repeated_rows_to_complete_last_group"] == 93
    assert datasets.load_from_disk(str(out / "sort")).num_rows == 100


@pytest.mark.subprocess
def test_kill_between_sort_and_pack_leaves_a_refused_pair_the_next_run_repairs(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    assert sort_and_group(out, "--group_size", "1", "--seed", "1").returncode == 0
    check_sort_pack_pair(out)
    kill_at([REPO / "sort_and_group.py", "--train_file", out, "--max_length", "512", "--group_size", "1",
             "--seed", "2"], fault_points.BETWEEN_SORT_AND_PACK, tmp_path)
    assert stats_of(out / "sort")["seed"] == 1 and stats_of(out / "pack")["seed"] == 2  # one of each
    with pytest.raises(DatasetValidationError, match="different sort_and_group.py runs"):
        check_sort_pack_pair(out)
    assert leftovers(out / "sort")  # the killed run's complete-but-unswapped sort/
    done = sort_and_group(out, "--group_size", "1", "--seed", "2")
    assert done.returncode == 0, done.stderr
    check_sort_pack_pair(out)
    assert stats_of(out / "sort")["seed"] == 2 and not leftovers(out / "sort") and not leftovers(out / "pack")


# ---- 9. BOM, interrupted swaps and leftovers, permissions, --output_dir . ----------------------------
@pytest.mark.subprocess
def test_a_bom_at_file_start_keeps_the_first_row_and_is_counted(tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], LONG, prefix=b"\xef\xbb\xbf")
    out = tmp_path / "out"
    done = pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert done.returncode == 0, done.stderr
    assert f"{raw['long']}:1: a UTF-8 byte-order mark" in done.stderr
    long = stats_of(out)["sources"]["long"]
    assert (long["kept"], long["skipped_invalid"], long["byte_order_marks_removed"]) == (4, 0, 1)
    done = pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "strict", "--strict")
    assert done.returncode != 0 and f"{raw['long']}:1: the file starts with a UTF-8 byte-order mark" in done.stderr


SWAP_KILLS = [  # (fault point, two-rename fallback, what the path holds right after the kill)
    (fault_points.NEW_OUTPUT_COMPLETE, False, "old"),
    (fault_points.OLD_OUTPUT_SWAPPED_OUT, False, "new"),
    (fault_points.BETWEEN_RENAMES, True, None),  # fallback only: nothing there until the next run
    (fault_points.OLD_OUTPUT_SWAPPED_OUT, True, "new"),
]


@pytest.mark.subprocess
@pytest.mark.parametrize("point, fallback, holds", SWAP_KILLS)
def test_a_kill_during_the_swap_keeps_the_output_readable_and_the_next_run_cleans_up(
        tmp_path, tiny_tokenizer_dir, raw, dataset_dir, point, fallback, holds):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)  # the old output: 7 rows
    write_jsonl(raw["long"], LONG[:2])  # the new one: 5 rows
    env = {"LONGALIGN_NO_RENAME_EXCHANGE": "1"} if fallback else {}
    args = [REPO / "pre_tokenize.py", "--model", "llama", "--tokenizer", tiny_tokenizer_dir, "--long", raw["long"],
            "--short", raw["short"], "--num_proc", "1", "--max_length", "512", "--output_dir", out]
    kill_at(args, point, tmp_path, **env)
    assert leftovers(out)
    if holds is None:
        assert not out.exists()
        assert clean_leftovers(out) and datasets.load_from_disk(str(out)).num_rows == 7  # the old one is back
    else:
        assert datasets.load_from_disk(str(out)).num_rows == {"old": 7, "new": 5}[holds]
    done = pre_tokenize(tiny_tokenizer_dir, raw, out, **env)
    assert done.returncode == 0, done.stderr
    assert datasets.load_from_disk(str(out)).num_rows == 5 and not leftovers(out)


@pytest.mark.subprocess
def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, tiny_tokenizer_dir, raw, dataset_dir):
    locked = tmp_path / "locked"
    shutil.copytree(dataset_dir, locked / "data")
    prefix = no_write_permission_prefix(locked)
    try:
        done = pre_tokenize(tiny_tokenizer_dir, raw, locked / "new", prefix=prefix)
        assert done.returncode != 0 and "cannot write in" in done.stderr and PROGRESS not in done.stderr
        (locked / "data").chmod(0o555)
        done = sort_and_group(locked / "data", "--group_size", "1", prefix=prefix)
        assert done.returncode != 0 and "cannot write in" in done.stderr
    finally:
        for folder in (locked, locked / "data"):
            folder.chmod(0o755)
    assert sorted(p.name for p in locked.iterdir()) == ["data"] and not (locked / "data" / "sort").exists()


@pytest.mark.subprocess
def test_output_dir_dot_is_refused_up_front(tmp_path, tiny_tokenizer_dir, raw):
    work = tmp_path / "work"
    work.mkdir()
    done = pre_tokenize(tiny_tokenizer_dir, raw, ".", cwd=work)
    assert done.returncode != 0 and "is the current directory" in done.stderr and PROGRESS not in done.stderr
    assert list(work.iterdir()) == []


@pytest.mark.subprocess
def test_outputs_carry_the_marker_and_still_load(dataset_dir):
    marker = json.loads((dataset_dir / OUTPUT_MARKER).read_text())
    assert marker["stage"] == "pre_tokenize" and "stats.json" in marker["entries"]
    assert datasets.load_from_disk(str(dataset_dir)).num_rows == 7


# ---- errors that name the file or flag at fault ---------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_broken_tokenizer_file_is_named_by_every_stage(tmp_path, tiny_tokenizer_dir, raw, name):
    import pre_tokenize as pre_tokenize_script
    from longalign.eval import generation
    from longalign.data import tokenization

    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    text = (folder / name).read_text(encoding="utf-8")
    (folder / name).write_text(text[:len(text) // 2], encoding="utf-8")  # a truncated copy / download
    message = rf"{folder / name}: not valid JSON \(.* at line \d+ column \d+\)"
    for load in (tokenization.load_tokenizer, generation.load_tokenizer):  # training / evaluation stages
        with pytest.raises(BrokenJsonFileError, match=message):
            load(str(folder))
    with pytest.raises(BrokenJsonFileError, match=message):
        pre_tokenize_script.main(["--model", "llama", "--tokenizer", str(folder), "--long", str(raw["long"]),
                                  "--short", str(raw["short"]), "--num_proc", "1", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_broken_checkpoint_config_is_named(tmp_path):
    from longalign.modeling.loading import model_family

    (tmp_path / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    with pytest.raises(BrokenJsonFileError, match=rf"{tmp_path / 'config.json'}: not valid JSON"):
        model_family(tmp_path)


@pytest.mark.subprocess
@pytest.mark.parametrize("script, flag", [("pre_tokenize", "--shuffle_seed"), ("sort_and_group", "--seed")])
def test_a_negative_seed_is_refused_naming_its_flag(capsys, tmp_path, dataset_dir, script, flag):
    import importlib

    argv = {"pre_tokenize": ["--model", "llama", "--output_dir", str(tmp_path / "o")],
            "sort_and_group": ["--train_file", str(dataset_dir)]}[script]
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main([*argv, flag, "-1"])
    assert stopped.value.code == 2
    assert f"argument {flag}: expected an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (dataset_dir / "sort").exists()
