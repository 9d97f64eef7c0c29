"""Issue 15, data stages: pre_tokenize.py and sort_and_group.py driven as a careless user, or a kill,
would drive them. Each test is named after the issue's numbered defect it reproduces and checks the
user-visible outcome: the error and its message, files on disk. Refusals run in-process through each
script's main(argv); subprocesses only where the point is a real exit code (one test per script) or a
real SIGKILL, sent from outside while the stage waits at a named fault point (longalign/fault_points.py)."""
import json
import re
import shutil

import datasets
import pytest

import pre_tokenize as pre_tokenize_script
import sort_and_group as sort_and_group_script
from helpers.faults_support import (REPO, isolated_process_state, kill_at, no_write_permission_prefix,
                                    pre_tokenize_argv, private_remote_code_cache, run_cli, snapshot,
                                    sort_and_group_argv, write_jsonl)
from helpers.pretokenize_inputs import messages
from longalign import fault_points
from longalign.data.conversations import InvalidInputError
from longalign.json_files import BrokenJsonFileError
from longalign.remote_code import RemoteCodeRequired
from longalign.storage import OUTPUT_MARKER, OutputRefusedError, clean_leftovers
from longalign.data.validation import DatasetValidationError, check_sort_pack_pair

pytestmark = pytest.mark.usefixtures(isolated_process_state.__name__)

LONG = [messages(f"Question {i}: what is the key?", f"The key is {i}.") for i in range(4)]
SHORT = [messages(f"hi {i}", f"hello {i}") for i in range(3)]
PROGRESS = "pre_tokenize:"  # the tokenization progress bar: absent when a check stops the run first


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    return {"long": write_jsonl(folder / "long.jsonl", LONG), "short": write_jsonl(folder / "short.jsonl", SHORT)}


def pre_tokenize(tokenizer, raw, out, *extra):
    """pre_tokenize.py in-process: its main(argv); a refusal raises."""
    pre_tokenize_script.main(pre_tokenize_argv(tokenizer, raw, out, *extra))


def sort_and_group(train_file, *extra):
    """sort_and_group.py in-process: its main(argv); a refusal raises."""
    sort_and_group_script.main(sort_and_group_argv(train_file, *extra))


def pre_tokenize_cli(tokenizer, raw, out, *extra, **kwargs):
    """pre_tokenize.py as a subprocess (the exit code, a kill): the completed process."""
    return run_cli([REPO / "pre_tokenize.py", *pre_tokenize_argv(tokenizer, raw, out, *extra)], **kwargs)


def sort_and_group_cli(train_file, *extra, **kwargs):
    return run_cli([REPO / "sort_and_group.py", *sort_and_group_argv(train_file, *extra)], **kwargs)


def stats_of(folder):
    return json.loads((folder / "stats.json").read_text())


def leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A pre_tokenize output of LONG + SHORT (7 rows), built once; tests copy it."""
    root = tmp_path_factory.mktemp("dataset")
    raw = {"long": write_jsonl(root / "long.jsonl", LONG), "short": write_jsonl(root / "short.jsonl", SHORT)}
    pre_tokenize(tiny_tokenizer_dir, raw, root / "data")
    return root / "data"


# ---- 1. --output_dir replaced whatever was there -------------------------------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_output_dir_holding_the_inputs_is_refused_and_nothing_is_deleted(tmp_path, tiny_tokenizer_dir, raw,
                                                                           overwrite):
    before = snapshot(tmp_path / "raw")
    with pytest.raises(OutputRefusedError, match=f"holds the input {re.escape(str(raw['long']))}"):
        pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "raw", *overwrite)
    assert snapshot(tmp_path / "raw") == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_an_unrelated_folder_or_a_regular_file_is_never_replaced(capsys, tmp_path, tiny_tokenizer_dir, raw,
                                                                 overwrite):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    regular = tmp_path / "model.bin"
    regular.write_bytes(b"weights")
    for target, message in ((unrelated, "not an output of pre_tokenize"), (regular, "is an existing file")):
        before = snapshot(target)
        with pytest.raises(OutputRefusedError, match=f"{re.escape(str(target))} .*{message}"):
            pre_tokenize(tiny_tokenizer_dir, raw, target, *overwrite)
        assert PROGRESS not in capsys.readouterr().err  # refused before any tokenization
        assert snapshot(target) == before


@pytest.mark.integration
def test_a_previous_output_is_replaced_but_not_what_was_put_in_it(tmp_path, tiny_tokenizer_dir, raw, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    sort_and_group(out, "--group_size", "1")  # sort/, pack/ inside the dataset
    write_jsonl(raw["long"], LONG[:1])
    with pytest.raises(OutputRefusedError, match="holds pack, sort, .*--overwrite_output_dir"):
        pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert (out / "sort").is_dir() and datasets.load_from_disk(str(out)).num_rows == 7
    pre_tokenize(tiny_tokenizer_dir, raw, out, "--overwrite_output_dir")
    assert not (out / "sort").exists() and datasets.load_from_disk(str(out)).num_rows == 4
    pre_tokenize(tiny_tokenizer_dir, raw, out)  # its own output, nothing else in it: replaced


def test_sort_and_group_never_replaces_a_file_at_sort_or_pack(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    (out / "pack").write_text("not a dataset")
    with pytest.raises(OutputRefusedError, match=f"{re.escape(str(out / 'pack'))} is an existing file"):
        sort_and_group(out, "--group_size", "1", "--overwrite_output_dir")
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


def test_tokenizer_code_runs_only_with_trust_remote_code(monkeypatch, tmp_path, tiny_tokenizer_dir, raw):
    tokenizer = tokenizer_with_code(tiny_tokenizer_dir, tmp_path / "custom")
    ran, out = tmp_path / "ran", tmp_path / "out"
    monkeypatch.setenv("REMOTE_CODE_RAN", str(ran))  # read by the tokenizer's code when it is imported
    with private_remote_code_cache(tmp_path / "hf_modules"):
        with pytest.raises(RemoteCodeRequired, match="auto_map.*--trust_remote_code"):
            pre_tokenize(tokenizer, raw, out)
        assert not ran.exists() and not out.exists()
        pre_tokenize(tokenizer, raw, out, "--trust_remote_code")
    assert ran.read_text() == "ran" and datasets.load_from_disk(str(out)).num_rows == 7


# ---- 3. one bad row stopped the run -----------------------------------------------------------------
SURROGATE_ROWS = [json.dumps(LONG[0]),
                  '{"messages": [{"role": "user", "content": "a lone \\ud800 surrogate"}, '
                  '{"role": "assistant", "content": "ok"}]}',
                  json.dumps(LONG[1]),
                  '{"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "x\\udfff"}]}',
                  '{"messages": [{"role": "user", "content": "a pair \\ud83d\\ude00 is fine"}, '
                  '{"role": "assistant", "content": "yes"}]}']


def test_lone_surrogate_rows_are_counted_with_file_and_line(capsys, tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], SURROGATE_ROWS)
    out = tmp_path / "out"
    pre_tokenize(tiny_tokenizer_dir, raw, out)
    err = capsys.readouterr().err
    assert "2 invalid input rows skipped" in err and PROGRESS in err  # the bar the refusals never show
    long = stats_of(out)["sources"]["long"]
    assert long["skipped_invalid_by_kind"] == {"lone_surrogate": 2} and long["kept"] == 3
    report = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert [(r["origin"], r["line"], r["kind"]) for r in report] == [
        (str(raw["long"]), 2, "lone_surrogate"), (str(raw["long"]), 4, "lone_surrogate")]


def test_strict_stops_at_the_lone_surrogate_naming_file_and_line(tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], SURROGATE_ROWS)
    with pytest.raises(InvalidInputError, match=re.escape(f"{raw['long']}:2: invalid row (lone_surrogate)")):
        pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "out", "--strict")
    assert not (tmp_path / "out").exists()


# ---- 6. outputs the next stage cannot read ----------------------------------------------------------
@pytest.mark.subprocess
def test_empty_input_exits_nonzero_and_writes_nothing(tmp_path, tiny_tokenizer_dir, raw):
    """pre_tokenize.py's exit-code test: a refusal is a nonzero exit with the message on stderr."""
    write_jsonl(raw["long"], [])
    write_jsonl(raw["short"], [])
    done = pre_tokenize_cli(tiny_tokenizer_dir, raw, tmp_path / "out")
    assert done.returncode != 0 and "no example to write" in done.stderr
    assert not (tmp_path / "out").exists()


def test_max_length_shorter_than_the_template_is_refused_before_tokenizing(capsys, tmp_path, tiny_tokenizer_dir,
                                                                            raw):
    with pytest.raises(ValueError, match="--max_length 3 is shorter than the llama chat template"):
        pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "out", "--max_length", "3")
    assert PROGRESS not in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_sort_and_group_on_an_empty_dataset_is_a_clear_error(tmp_path):
    """sort_and_group.py's exit-code test: a nonzero exit naming the problem, not an IndexError."""
    feature = datasets.List(datasets.Value("int32"))
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"input_ids": [], "labels": []},
                               features=datasets.Features({"input_ids": feature, "labels": feature})
                               ).save_to_disk(str(empty))
    done = sort_and_group_cli(empty, "--group_size", "1")
    assert done.returncode != 0 and "has no rows" in done.stderr and "IndexError" not in done.stderr
    assert not (empty / "sort").exists() and not (empty / "pack").exists()


# ---- 8. group_size above the dataset; sort/ and pack/ from different runs -------------------------------
def test_group_size_larger_than_the_dataset_is_an_error_unless_asked(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    with pytest.raises(ValueError, match="larger than the dataset's 7 sequences.*--repeat_small_dataset"):
        sort_and_group(out, "--group_size", "100")
    assert not (out / "sort").exists() and not (out / "pack").exists()
    sort_and_group(out, "--group_size", "100", "--repeat_small_dataset")
    assert stats_of(out / "sort")["repeated_rows_to_complete_last_group"] == 93
    assert datasets.load_from_disk(str(out / "sort")).num_rows == 100


@pytest.mark.subprocess
def test_kill_between_sort_and_pack_leaves_a_refused_pair_the_next_run_repairs(tmp_path, dataset_dir):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)
    sort_and_group(out, "--group_size", "1", "--seed", "1")
    check_sort_pack_pair(out)
    kill_at([REPO / "sort_and_group.py", *sort_and_group_argv(out, "--group_size", "1", "--seed", "2")],
            fault_points.BETWEEN_SORT_AND_PACK, tmp_path)
    assert stats_of(out / "sort")["seed"] == 1 and stats_of(out / "pack")["seed"] == 2  # one of each
    with pytest.raises(DatasetValidationError, match="different sort_and_group.py runs"):
        check_sort_pack_pair(out)
    assert leftovers(out / "sort")  # the killed run's complete-but-unswapped sort/
    sort_and_group(out, "--group_size", "1", "--seed", "2")
    check_sort_pack_pair(out)
    assert stats_of(out / "sort")["seed"] == 2 and not leftovers(out / "sort") and not leftovers(out / "pack")


# ---- 9. BOM, interrupted swaps and leftovers, permissions, --output_dir . ----------------------------
def test_a_bom_at_file_start_keeps_the_first_row_and_is_counted(capsys, tmp_path, tiny_tokenizer_dir, raw):
    write_jsonl(raw["long"], LONG, prefix=b"\xef\xbb\xbf")
    out = tmp_path / "out"
    pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert f"{raw['long']}:1: a UTF-8 byte-order mark" in capsys.readouterr().err
    long = stats_of(out)["sources"]["long"]
    assert (long["kept"], long["skipped_invalid"], long["byte_order_marks_removed"]) == (4, 0, 1)
    with pytest.raises(InvalidInputError, match=re.escape(f"{raw['long']}:1: the file starts with a UTF-8 "
                                                          "byte-order mark")):
        pre_tokenize(tiny_tokenizer_dir, raw, tmp_path / "strict", "--strict")
    assert not (tmp_path / "strict").exists()


SWAP_KILLS = [  # (fault point, two-rename fallback, what the path holds right after the kill)
    (fault_points.NEW_OUTPUT_COMPLETE, False, "old"),
    (fault_points.OLD_OUTPUT_SWAPPED_OUT, False, "new"),
    (fault_points.BETWEEN_RENAMES, True, None),  # fallback only: nothing there until the next run
    (fault_points.OLD_OUTPUT_SWAPPED_OUT, True, "new"),
]


@pytest.mark.subprocess
@pytest.mark.parametrize("point, fallback, holds", SWAP_KILLS)
def test_a_kill_during_the_swap_keeps_the_output_readable_and_the_next_run_cleans_up(
        monkeypatch, tmp_path, tiny_tokenizer_dir, raw, dataset_dir, point, fallback, holds):
    out = tmp_path / "data"
    shutil.copytree(dataset_dir, out)  # the old output: 7 rows
    write_jsonl(raw["long"], LONG[:2])  # the new one: 5 rows
    env = {fault_points.NO_EXCHANGE_ENV: "1"} if fallback else {}
    kill_at([REPO / "pre_tokenize.py", *pre_tokenize_argv(tiny_tokenizer_dir, raw, out)], point, tmp_path, **env)
    assert leftovers(out)
    if holds is None:
        assert not out.exists()
        assert clean_leftovers(out) and datasets.load_from_disk(str(out)).num_rows == 7  # the old one is back
    else:
        assert datasets.load_from_disk(str(out)).num_rows == {"old": 7, "new": 5}[holds]
    for name, value in env.items():  # read when the swap is made: the same path as the killed run
        monkeypatch.setenv(name, value)
    pre_tokenize(tiny_tokenizer_dir, raw, out)
    assert datasets.load_from_disk(str(out)).num_rows == 5 and not leftovers(out)


@pytest.mark.subprocess
def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, tiny_tokenizer_dir, raw, dataset_dir):
    """Subprocesses: as root, only a process started under setpriv (no CAP_DAC_OVERRIDE) is refused."""
    locked = tmp_path / "locked"
    shutil.copytree(dataset_dir, locked / "data")
    prefix = no_write_permission_prefix(locked)
    try:
        done = pre_tokenize_cli(tiny_tokenizer_dir, raw, locked / "new", prefix=prefix)
        assert done.returncode != 0 and "cannot write in" in done.stderr and PROGRESS not in done.stderr
        (locked / "data").chmod(0o555)
        done = sort_and_group_cli(locked / "data", "--group_size", "1", prefix=prefix)
        assert done.returncode != 0 and "cannot write in" in done.stderr
    finally:
        for folder in (locked, locked / "data"):
            folder.chmod(0o755)
    assert sorted(p.name for p in locked.iterdir()) == ["data"] and not (locked / "data" / "sort").exists()


def test_output_dir_dot_is_refused_up_front(capsys, monkeypatch, tmp_path, tiny_tokenizer_dir, raw):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(OutputRefusedError, match=f"{re.escape(str(work))} is the current directory"):
        pre_tokenize(tiny_tokenizer_dir, raw, ".")
    assert PROGRESS not in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_outputs_carry_the_marker_and_still_load(dataset_dir):
    marker = json.loads((dataset_dir / OUTPUT_MARKER).read_text())
    assert marker["stage"] == "pre_tokenize" and "stats.json" in marker["entries"]
    assert datasets.load_from_disk(str(dataset_dir)).num_rows == 7


# ---- errors that name the file or flag at fault ---------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_broken_tokenizer_file_is_named_by_every_stage(tmp_path, tiny_tokenizer_dir, raw, name):
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


@pytest.mark.parametrize("script, flag", [(pre_tokenize_script, "--shuffle_seed"), (sort_and_group_script, "--seed")])
def test_a_negative_seed_is_refused_naming_its_flag(capsys, tmp_path, dataset_dir, script, flag):
    argv = {pre_tokenize_script: ["--model", "llama", "--output_dir", str(tmp_path / "o")],
            sort_and_group_script: ["--train_file", str(dataset_dir)]}[script]
    with pytest.raises(SystemExit) as stopped:
        script.main([*argv, flag, "-1"])
    assert stopped.value.code == 2
    assert f"argument {flag}: expected an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (dataset_dir / "sort").exists()
