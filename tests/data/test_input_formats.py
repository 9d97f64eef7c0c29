"""pre_tokenize reads data as people have it: JSONL, JSON arrays, gzip'd files, parquet and Hugging
Face datasets, in the messages or the ShareGPT format, with system turns; data without system
turns tokenizes exactly as before; a source with no usable row, or one given as both --long and
--short, is refused; and a ShareGPT dump goes through pre_tokenize, sort_and_group and train."""
import gzip
import json
import os
from pathlib import Path

import pytest

from longalign.data.conversations import InvalidInputError, validate_row
from longalign.data.input_files import UnreadableSourceError
from longalign.data.tokenize_stage import INVALID_REPORT, run_pretokenize
from longalign.data.training_format import conversation_text
from helpers.pretokenize_inputs import load_rows, make_config, messages, write_jsonl

BEFORE = Path(__file__).resolve().parent / "ids_before_system_turns"
ROWS = [messages("What is the key?", "The key is 42."), messages("hi", "hello", "And the lock?", "It opens.")]
SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


def sharegpt(row: dict, speakers=SPEAKERS) -> dict:
    """The same conversation in the ShareGPT format."""
    return {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in row["messages"]]}


def write_json(path, rows, compress=False):
    data = json.dumps(rows, ensure_ascii=False, indent=2).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def write_file(tmp_path, container, rows):
    """`rows` in `container`: jsonl, jsonl.gz, json, json.gz or parquet."""
    path = tmp_path / f"data.{container}"
    if container == "jsonl":
        return write_jsonl(path, rows)
    if container == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return str(path)
    if container == "parquet":
        return write_parquet(path, rows)
    return write_json(path, rows, compress=container == "json.gz")


# ---- row formats ---------------------------------------------------------------------------
def test_sharegpt_speakers_map_to_roles():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q1"},
                             {"from": "chatgpt", "value": "a1"}, {"from": "user", "value": "q2"},
                             {"from": "bard", "value": "a2"}, {"from": "human", "value": "q3"},
                             {"from": "assistant", "value": "a3"}], "id": "ignored"}
    conversation = validate_row(row, 7)
    assert conversation.rounds == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    assert (conversation.system, conversation.row_format, conversation.line) == ("Be brief.", "sharegpt", 7)
    turns = ["q1", "a1", "q2", "a2", "q3", "a3"]
    as_messages = validate_row({"messages": [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]}, 7)
    assert (as_messages.rounds, as_messages.system) == (conversation.rounds, conversation.system)


BAD_SHAREGPT = {
    "unknown_role": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}],
    "wrong_role_order": [{"from": "human", "value": "q"}, {"from": "human", "value": "again"}],
    "misplaced_system": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}],
    "non_string_content": [{"from": "human", "value": ["q"]}],
    "bad_messages": [],
}


@pytest.mark.parametrize("kind", sorted(BAD_SHAREGPT))
def test_other_speakers_and_broken_order_make_a_row_invalid_by_kind(kind):
    bad = validate_row({"conversations": BAD_SHAREGPT[kind]}, 3)
    assert (bad.kind, bad.line, bad.row_format) == (kind, 3, "sharegpt")
    assert "conversations" in bad.reason  # the reason names the format's own keys
    assert validate_row({"messages": [{"role": "user", "content": "q"}], "conversations": [{}]}, 1).kind == \
        "ambiguous_format"


def test_system_turn_opens_a_messages_row_and_nowhere_else():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    assert validate_row(row, 1).system == "S" and validate_row(row, 1).rounds == [("q", "a")]
    row["messages"].append({"role": "system", "content": "again"})
    assert validate_row(row, 1).kind == "misplaced_system"


# ---- containers ----------------------------------------------------------------------------
CONTAINERS = {"jsonl": ("jsonl", None), "jsonl.gz": ("jsonl", "gzip"), "json": ("json_array", None),
              "json.gz": ("json_array", "gzip"), "parquet": ("parquet", None)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_tokenizer_dir):
    """The ids of ROWS read from a messages JSONL file."""
    tmp = tmp_path_factory.mktemp("baseline")
    config = make_config(tmp, tiny_tokenizer_dir, [], ROWS)
    run_pretokenize(config)
    return load_rows(config.output_dir)[0].to_dict()


@pytest.mark.parametrize("row_format", ["messages", "sharegpt"])
@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_each_container_and_row_format_gives_the_same_ids(tmp_path, tiny_tokenizer_dir, baseline, container,
                                                          row_format):
    rows = ROWS if row_format == "messages" else [sharegpt(r) for r in ROWS]
    config = make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=write_file(tmp_path, container, rows))
    stats = run_pretokenize(config)
    assert load_rows(config.output_dir)[0].to_dict() == baseline
    short = stats["sources"]["short"]
    assert (short["container"], short["compression"]) == CONTAINERS[container]
    assert short["rows_by_format"] == {row_format: len(ROWS)} and short["kept"] == len(ROWS)


def test_json_array_rows_are_numbered_by_the_line_they_start_on(tmp_path, tiny_tokenizer_dir):
    rows = [sharegpt(ROWS[0]), {"conversations": BAD_SHAREGPT["unknown_role"]}, "not a row", ROWS[1]]
    config = make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=write_json(tmp_path / "d.json", rows))
    stats = run_pretokenize(config)
    short = stats["sources"]["short"]
    assert (short["kept"], short["skipped_invalid"]) == (2, 2)
    assert short["rows_by_format"] == {"messages": 1, "none": 1, "sharegpt": 2}
    lines = (tmp_path / "d.json").read_text().splitlines()
    report = [json.loads(r) for r in (Path(config.output_dir) / INVALID_REPORT).read_text().splitlines()]
    assert [lines[r["line"] - 1].strip()[:1] for r in report] == ["{", '"']  # each row starts on its line
    config.strict = True
    with pytest.raises(InvalidInputError, match=rf"d\.json:{report[0]['line']}: invalid row \(unknown_role\)"):
        run_pretokenize(config)


@pytest.mark.parametrize("content, error", [
    (b'[{"messages": []},\n {"conversations": [}\n]', r"d\.json:2:\d+: malformed JSON array"),
    (b'[{"conversations": []}] trailing', r"d\.json: text after the JSON array"),
    (b'[{"a": 1}\n{"b": 2}]', r"d\.json:2: malformed JSON array \(expected ',' or '\]'"),
])
def test_a_broken_json_array_is_an_error_naming_file_and_line(tmp_path, tiny_tokenizer_dir, content, error):
    (tmp_path / "d.json").write_bytes(content)
    with pytest.raises(UnreadableSourceError, match=error):
        run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=str(tmp_path / "d.json")))


def test_a_truncated_gzip_file_is_an_error_naming_it(tmp_path, tiny_tokenizer_dir):
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 50).encode())
    (tmp_path / "d.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(UnreadableSourceError, match=r"d\.jsonl\.gz: a gzip file that cannot be read"):
        run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=str(tmp_path / "d.jsonl.gz")))


# ---- Hugging Face datasets -----------------------------------------------------------------
def test_hub_dataset_id_with_split_goes_through_load_dataset(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or
                        datasets.Dataset.from_list([sharegpt(r) for r in ROWS]))
    stats = run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path="someone/chats:test",
                                        long_path="someone/long_chats", datanum=1))
    assert calls == [("someone/chats", "test"), ("someone/long_chats", "train")]  # short first
    assert stats["sources"]["short"]["origin"] == "hf:someone/chats:test"
    assert stats["sources"]["short"]["container"] == "hf_dataset" and stats["total"]["kept"] == 3


def test_a_local_dataset_folder_loads_offline(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [sharegpt(r) for r in ROWS])
    write_jsonl(folder / "test.jsonl", [sharegpt(ROWS[0])])
    for value, kept in ((str(folder), 2), (f"{folder}:test", 1)):
        out = tmp_path / f"out{kept}"
        stats = run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=value,
                                            output_dir=str(out)))
        assert stats["sources"]["short"]["kept"] == kept and stats["sources"]["short"]["origin"] == value


def test_a_missing_file_that_looks_like_a_path_is_never_a_dataset_id(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a typo must not download"))
    for value in ("data/sharegpt.json", "raw/x/y.jsonl", str(tmp_path / "nope"), "./org/name"):
        with pytest.raises(FileNotFoundError, match="short data file not found"):
            run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=value))


# ---- a source with no usable row; the same data twice -----------------------------------------
@pytest.mark.parametrize("content", ["plain text\nmore text\n", '{"text": "a"}\n{"text": "b"}\n',
                                     '[{"prompt": "q", "response": "a"}]'])
def test_a_source_without_any_conversation_is_an_error_naming_it(tmp_path, tiny_tokenizer_dir, content):
    (tmp_path / "other.json").write_text(content)
    config = make_config(tmp_path, tiny_tokenizer_dir, ROWS, [], short_path=str(tmp_path / "other.json"))
    with pytest.raises(UnreadableSourceError, match=r"--short .*other\.json: none of the \d rows read is a "
                                                    r"conversation .*expected JSONL.*ShareGPT"):
        run_pretokenize(config)
    assert not Path(config.output_dir).exists()


@pytest.mark.parametrize("sharegpt_file", ["dump.json", "dump.jsonl", "dump.jsonl.gz"])
def test_a_sharegpt_dump_as_short_is_read_not_dropped(tmp_path, tiny_tokenizer_dir, sharegpt_file):
    """Before: every row 'invalid', exit 0, the whole source dropped behind one warning."""
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, *sharegpt(r)["conversations"]]}
            for r in ROWS]
    path = tmp_path / sharegpt_file
    if sharegpt_file == "dump.json":
        write_json(path, rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text) if sharegpt_file.endswith(".gz") else text)
    stats = run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, ROWS, [], short_path=str(path)))
    short = stats["sources"]["short"]
    assert (short["kept"], short["skipped_invalid"], stats["sources"]["long"]["kept"]) == (2, 0, 2)
    assert short["system_prompts"] == 2


def test_the_same_file_as_long_and_short_is_refused(tmp_path, tiny_tokenizer_dir):
    path = write_jsonl(tmp_path / "chats.jsonl", ROWS)
    os.symlink(path, tmp_path / "link.jsonl")
    for long in (path, str(tmp_path / "link.jsonl"), f"{tmp_path}/./chats.jsonl"):
        config = make_config(tmp_path, tiny_tokenizer_dir, [], [], long_path=long, short_path=path)
        with pytest.raises(ValueError, match=rf"--long {long} and --short {path} name the same data"):
            run_pretokenize(config)
        assert not Path(config.output_dir).exists()
    run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], long_path=path, short_path=path, datanum=0))


@pytest.mark.integration
def test_the_same_file_as_long_and_short_fails_on_the_command_line(tmp_path, tiny_tokenizer_dir):
    import pre_tokenize

    path = write_jsonl(tmp_path / "chats.jsonl", ROWS)
    with pytest.raises(ValueError, match="--long .* and --short .* name the same data"):
        pre_tokenize.main(["--model", "llama", "--tokenizer", tiny_tokenizer_dir, "--long", path, "--short", path,
                           "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])


# ---- data without system turns: the ids recorded before they were supported ------------------
def before_cases():
    return json.loads((BEFORE / "expected.json").read_text())


@pytest.mark.parametrize("case", sorted(before_cases()))
def test_data_without_system_turns_tokenizes_exactly_as_before(tmp_path, case):
    """tests/data/ids_before_system_turns: ids and labels recorded from the code before system
    turns, ShareGPT and the text budget; sample.jsonl read as messages and, converted, as ShareGPT."""
    import datasets
    from helpers.tokenizer_builders import ChatGLM3LikeTokenizer

    from longalign.data.conversations import read_jsonl
    from longalign.data.tokenize_stage import PretokenizeConfig
    from longalign.data.tokenization import ConversationTokenizer, finish_example

    expected = before_cases()[case]
    name, mode = case.split("/")
    sample = [json.loads(line) for line in (BEFORE / "sample.jsonl").read_text().splitlines()]
    if name == "chatglm3_like_chatglm":
        tokenizer = ChatGLM3LikeTokenizer(str(BEFORE / "sentencepiece" / "tokenizer.model"))
        rows = [r.rounds for r in read_jsonl(BEFORE / "sample.jsonl").rows]
        examples = [finish_example(e, 96, mode) for e in ConversationTokenizer(tokenizer, "chatglm").encode_batch(rows)]
        got = [{"input_ids": e.input_ids.tolist(), "labels": e.labels.tolist()} for e in examples
               if e.input_ids is not None]
        assert got == expected
        return
    tokenizer, family = {"byte_level_llama": ("byte_level", "llama"), "byte_level_chatglm": ("byte_level", "chatglm"),
                         "sentencepiece_llama": ("sentencepiece", "llama")}[name]
    for source in (str(BEFORE / "sample.jsonl"), write_json(tmp_path / "sample.json", [sharegpt(r) for r in sample])):
        out = tmp_path / Path(source).suffix[1:]
        run_pretokenize(PretokenizeConfig(family=family, tokenizer=str(BEFORE / tokenizer), long_path=source,
                                          short_path=write_jsonl(tmp_path / "empty.jsonl", []), datanum=100,
                                          max_length=96, truncate=mode, num_proc=1, output_dir=str(out)))
        rows = datasets.load_from_disk(str(out)).to_dict()
        assert [{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])] == expected


# ---- end to end: a ShareGPT dump into training ----------------------------------------------
@pytest.mark.integration
def test_sharegpt_json_with_system_turns_trains_end_to_end(tmp_path, tiny_tokenizer_dir):
    """pre_tokenize.py --short sharegpt.json (a ShareGPT array, system turns) -> sort_and_group.py
    -> train.py for 2 steps (each script's main on its command line, in this process); the trained
    tokenizer's chat_template renders the trained text."""
    import datasets
    import pre_tokenize
    import sort_and_group
    import train
    from transformers import AutoTokenizer

    from longalign.demo.tiny_model import TinyShape, save_tiny_model

    dump = [{"id": f"c{i}", "conversations": [{"from": "system", "value": "You are a helpful assistant."},
                                              {"from": "human", "value": f"Question {i}: what is the key?"},
                                              {"from": "gpt", "value": f"The key is {i}."}]} for i in range(6)]
    write_json(tmp_path / "sharegpt.json", dump)
    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "trained"
    pre_tokenize.main(["--model", "llama", "--tokenizer", tiny_tokenizer_dir, "--datanum", "0",
                       "--short", str(tmp_path / "sharegpt.json"), "--max_length", "256", "--num_proc", "1",
                       "--output_dir", str(data)])
    sort_and_group.main(["--train_file", str(data), "--group_size", "1", "--max_length", "256"])
    stats = json.loads((data / "stats.json").read_text())["sources"]["short"]
    assert (stats["container"], stats["rows_by_format"], stats["system_prompts"], stats["kept"]) == \
        ("json_array", {"sharegpt": 6}, 6, 6)
    save_tiny_model("llama", tiny_tokenizer_dir, model, TinyShape(hidden=32, layers=1, heads=2, kv_heads=1,
                                                                  intermediate=64, max_positions=256))
    train.main(["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out),
                "--batch_method", "pack", "--pack_loss", "--use_cpu", "--per_device_train_batch_size", "1",
                "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
                "--seed", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    first = datasets.load_from_disk(str(data))[0]["input_ids"]
    system, user, reply = "You are a helpful assistant.", "Question 0: what is the key?", "The key is 0."
    chat = [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": reply}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == "<s>" + conversation_text("llama", [(user, reply)], system)
    assert tokenizer.decode(first) == rendered + "</s>"
