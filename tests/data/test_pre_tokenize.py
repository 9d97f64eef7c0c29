"""pre_tokenize: exact labels, truncation, --datanum, bad input, --strict, atomic output, CLI."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longalign.constants import IGNORE_INDEX
from longalign.data.conversations import InvalidInputError, parse_datanum, read_jsonl
from longalign.data.tokenize_stage import INVALID_REPORT, NothingToWriteError, run_pretokenize
from longalign.data.training_format import conversation_text, round_prompt
from longalign.data.tokenization import ConversationTokenizer, finish_example, truncate
from helpers.pretokenize_inputs import load_rows, make_config, messages

REPO = Path(__file__).resolve().parents[2]
MULTI = [("What is the key?", "The key is 42."), ("And the lock?", ".lock opens"), ("Bye", "Bye!")]


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def labelled_runs(labels):
    """Contiguous runs of target positions, as lists of indices."""
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


# ---- exact labels (the exact-ids tests of both families: tests/data/test_labels.py) ---------------
@pytest.mark.parametrize("family", ["chatglm", "llama"])
def test_label_spans_are_exactly_each_reply_and_its_closing_eos(tiny_tokenizer, family):
    encoder = ConversationTokenizer(tiny_tokenizer, family)
    [encoded] = encoder.encode_batch([MULTI])
    ids, labels = encoded.ids, encoded.labels
    eos = tiny_tokenizer.eos_token_id
    assert ids[:len(encoder.prefix)] == [tiny_tokenizer.bos_token_id]  # from add_special_tokens
    assert ids[-1] == labels[-1] == eos
    assert decode(tiny_tokenizer, ids[1:-1]) == conversation_text(family, MULTI)
    runs = labelled_runs(labels)
    assert len(runs) == len(MULTI)
    for index, (run, (_, reply)) in enumerate(zip(runs, MULTI)):
        assert [labels[i] for i in run[:-1]] == [ids[i] for i in run[:-1]]  # reply labels = its tokens
        assert decode(tiny_tokenizer, [ids[i] for i in run[:-1]]) == reply
        assert labels[run[-1]] == eos  # every reply is closed by an EOS target
        if index < len(MULTI) - 1:  # ... whose input stays the text that follows: "\n\n" + next prompt
            follow = "\n\n" + round_prompt(family, index + 2, MULTI[index + 1][0])
            assert ids[run[-1]] == tiny_tokenizer(follow, add_special_tokens=False)["input_ids"][0]


def sentencepiece_like_tokenizer():
    """A Metaspace BPE (no pre-splitting, like SentencePiece) whose merges cross "[/INST]" + reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["[INST]open it[/INST].lock opens\n\n[INST]why[/INST].lock"] * 50, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.integration
def test_reply_span_is_exact_where_whole_text_tokens_would_straddle_it():
    tokenizer = sentencepiece_like_tokenizer()
    prompt, reply = "[INST]open it[/INST]", ".lock opens"
    whole = tokenizer(prompt + reply, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(start < len(prompt) < end for start, end in whole)  # the case this design exists for
    [encoded] = ConversationTokenizer(tokenizer, "llama").encode_batch([[("open it", reply)]])
    ids, labels = encoded.ids, encoded.labels
    assert ids[0] == tokenizer.bos_token_id and labels[-1] == tokenizer.eos_token_id
    run = labelled_runs(labels)[0]
    assert decode(tokenizer, [ids[i] for i in run[:-1]]) == reply
    assert ids[1:run[0]] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded.differs_from_whole_text  # counted in stats.json (ids_differ_from_whole_text)


def test_conversation_without_rounds_has_no_target(tiny_tokenizer):
    encoder = ConversationTokenizer(tiny_tokenizer, "llama")
    [encoded] = encoder.encode_batch([[]])
    assert finish_example(encoded, 100, "right").status == "skipped_no_target"


# ---- truncation --------------------------------------------------------------------------
def test_truncate_modes():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 5 + list(range(5, 10))
    assert truncate(ids, labels, 10, "right") == (ids, labels, "kept")
    assert truncate(ids, labels, 4, "right") == (ids[:4], labels[:4], "truncated")
    assert truncate(ids, labels, 5, "left") == ([0, 1, 7, 8, 9], labels[:2] + labels[-3:], "truncated")
    assert truncate(ids, labels, 4, "skip")[2] == "skipped_too_long"
    with pytest.raises(ValueError, match="truncation mode"):
        truncate(ids, labels, 4, "middle")


@pytest.mark.parametrize("mode", ["right", "left", "skip"])
def test_truncation_end_to_end(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, mode):
    long_reply = "The quick brown fox jumps over the lazy dog. " * 6
    short_row = messages("hi", "hello")
    config = make_config(tmp_path, tiny_tokenizer_dir, [messages("Summarize the document.", long_reply)],
                         [short_row], max_length=20, truncate=mode)
    full_ids = ConversationTokenizer(tiny_tokenizer, "llama").encode_batch(
        [[("Summarize the document.", long_reply)]])[0].ids
    assert len(full_ids) > 20
    run_pretokenize(config)
    ds, stats = load_rows(config.output_dir)
    long_stats = stats["sources"]["long"]
    if mode == "skip":
        assert long_stats["skipped_too_long"] == 1 and long_stats["kept"] == 0 and len(ds) == 1
        return
    assert long_stats["truncated"] == long_stats["kept"] == 1
    row = ds[0]["input_ids"]
    assert len(row) == 20 and len(ds[0]["labels"]) == 20
    expected = full_ids[:20] if mode == "right" else full_ids[:2] + full_ids[-18:]
    assert row == expected


def test_truncation_that_removes_every_target_is_counted(tmp_path, tiny_tokenizer_dir):
    config = make_config(tmp_path, tiny_tokenizer_dir, [messages("word " * 50, "answer")], [],
                         max_length=10, truncate="right")
    with pytest.raises(NothingToWriteError) as refused:  # an empty dataset is not written
        run_pretokenize(config)
    assert refused.value.stats["sources"]["long"]["skipped_no_target"] == 1
    assert refused.value.stats["total"]["kept"] == 0 and not Path(config.output_dir).exists()


# ---- cleaning ----------------------------------------------------------------------------
def test_zero_width_removed_from_assistant_only_and_trailing_user_dropped(tmp_path, tiny_tokenizer_dir,
                                                                          tiny_tokenizer):
    row = messages("a\u200bb", "He\u200bl\u200cl\u200do\ufeff", "unanswered")
    config = make_config(tmp_path, tiny_tokenizer_dir, [row], [])
    stats = run_pretokenize(config)
    ds, _ = load_rows(config.output_dir)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    run = labelled_runs(labels)[0]
    assert decode(tiny_tokenizer, [ids[i] for i in run[:-1]]) == "Hello"
    assert decode(tiny_tokenizer, ids[1:-1]) == "[INST]a\u200bb[/INST]Hello"  # user text untouched
    assert stats["sources"]["long"]["zero_width_chars_removed"] == 4
    assert stats["sources"]["long"]["dropped_trailing_user_turns"] == 1


def test_single_user_turn_is_skipped_as_no_target(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(NothingToWriteError) as refused:
        run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [messages("only a question")], []))
    assert refused.value.stats["sources"]["long"]["skipped_no_target"] == 1


# ---- --datanum ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("0k", 0), ("5k", 5000), ("10k", 10000), ("123", 123), ("2K", 2000)])
def test_parse_datanum(text, value):
    assert parse_datanum(text) == value


@pytest.mark.parametrize("text", ["abc", "-1", "1.5k", "", "k"])
def test_parse_datanum_rejects(text):
    with pytest.raises(ValueError, match="datanum"):
        parse_datanum(text)


@pytest.mark.parametrize("datanum,expected_long", [(0, 0), (3, 3), (10_000, 5)])
def test_datanum_takes_first_long_rows_and_all_short(tmp_path, tiny_tokenizer_dir, tiny_tokenizer,
                                                     datanum, expected_long):
    long_rows = [messages(f"long question {i}", f"long answer {i}") for i in range(5)]
    short_rows = [messages(f"short {i}", f"reply {i}") for i in range(4)]
    config = make_config(tmp_path, tiny_tokenizer_dir, long_rows, short_rows, datanum=datanum)
    stats = run_pretokenize(config)
    ds, _ = load_rows(config.output_dir)
    assert stats["sources"]["long"]["kept"] == expected_long
    assert stats["sources"]["short"]["kept"] == 4
    texts = [decode(tiny_tokenizer, r) for r in ds["input_ids"]]
    assert [t for t in texts if "long answer" in t] == [
        f"<s>[INST]long question {i}[/INST]long answer {i}</s>" for i in range(expected_long)]


# ---- bad input ---------------------------------------------------------------------------
BAD_ROWS = [
    messages("fine", "ok"),                                              # line 1
    '{"messages": [',                                                    # 2 malformed JSON
    {"conversation": []},                                                # 3 missing messages
    {"messages": [{"role": "assistant", "content": "x"}]},               # 4 wrong role order
    {"messages": [{"role": "user", "content": ["x"]}]},                  # 5 non-string content
    {"messages": [{"role": "tool", "content": "x"}]},                    # 6 unknown role
    messages("also", "fine"),                                            # 7
]
EXPECTED_BAD = {2: "malformed_json", 3: "missing_messages", 4: "wrong_role_order",
                5: "non_string_content", 6: "unknown_role"}


def test_each_bad_row_kind_is_counted_with_its_line_number(tmp_path, tiny_tokenizer_dir):
    config = make_config(tmp_path, tiny_tokenizer_dir, BAD_ROWS, [])
    stats = run_pretokenize(config)
    long_stats = stats["sources"]["long"]
    assert long_stats["skipped_invalid"] == 5 and long_stats["kept"] == 2
    assert long_stats["skipped_invalid_by_kind"] == {kind: 1 for kind in EXPECTED_BAD.values()}
    report = [json.loads(line) for line in (Path(config.output_dir) / INVALID_REPORT).read_text().splitlines()]
    assert {r["line"]: r["kind"] for r in report} == EXPECTED_BAD
    assert all(r["source"] == "long" and r["origin"] == config.long_path and r["reason"] for r in report)
    accounted = sum(long_stats[k] for k in ("kept", "skipped_too_long", "skipped_invalid", "skipped_no_target"))
    assert accounted == long_stats["rows_read"] == len(BAD_ROWS)


def test_blank_lines_are_counted_not_rows(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(messages("a", "b")) + "\n\n   \n" + json.dumps(messages("c", "d")) + "\n")
    source = read_jsonl(path)
    assert (len(source.rows), source.blank_lines, source.rows[1].line) == (2, 2, 4)


def test_strict_stops_at_first_bad_row_and_writes_nothing(tmp_path, tiny_tokenizer_dir):
    config = make_config(tmp_path, tiny_tokenizer_dir, BAD_ROWS, [], strict=True)
    with pytest.raises(InvalidInputError, match=r"long\.jsonl:2: .*malformed_json"):
        run_pretokenize(config)
    assert not Path(config.output_dir).exists()


def test_missing_input_file_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    config = make_config(tmp_path, tiny_tokenizer_dir, [], [], short_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*data/README\.md"):
        run_pretokenize(config)
    config = make_config(tmp_path, tiny_tokenizer_dir, [], [], long_path=str(tmp_path / "gone.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"gone\.jsonl"):
        run_pretokenize(config)


def test_default_long_path_falls_back_to_hub_dataset(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)  # no data/raw/long.jsonl here
    hub_rows = [messages(f"q{i}", f"a{i}") for i in range(4)]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: calls.append((name, split)) or datasets.Dataset.from_list(hub_rows))
    stats = run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], long_path=None, datanum=3))
    assert calls == [("THUDM/LongAlign-10k", "train")]
    assert stats["sources"]["long"]["origin"] == "hf:THUDM/LongAlign-10k"
    assert (stats["sources"]["long"]["kept"], stats["sources"]["long"]["available"]) == (3, 4)

    def offline(name, split):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"THUDM/LongAlign-10k.*Offline\?.*--long"):
        run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [], long_path=None))
    stats = run_pretokenize(make_config(tmp_path, tiny_tokenizer_dir, [], [messages("a", "b")],
                                        long_path=None, datanum=0))  # 0k: no download attempted
    assert stats["sources"]["long"]["rows_read"] == 0 and stats["total"]["kept"] == 1


# ---- output --------------------------------------------------------------------------------
def test_output_format_and_stats(tmp_path, tiny_tokenizer_dir):
    import datasets

    long_rows = [messages("x " * (500 * i + 1), "y " * (i + 1)) for i in range(6)]  # enough tokens that
    # the Arrow file's fixed header is small against 4 + 4 bytes per token (the <= 9 goal)
    config = make_config(tmp_path, tiny_tokenizer_dir, long_rows, [messages("hi", "there", "more?", "yes")],
                         max_length=65536)
    stats = run_pretokenize(config)
    ds, saved = load_rows(config.output_dir)
    assert saved == json.loads(json.dumps(stats))
    for column in ("input_ids", "labels"):
        assert ds.features[column] == datasets.List(datasets.Value("int32"))
    assert all(len(a) == len(b) for a, b in zip(ds["input_ids"], ds["labels"]))
    assert stats["total"]["tokens"] == sum(len(r) for r in ds["input_ids"])
    assert stats["total"]["target_tokens"] == sum(int(np.sum(np.array(r) != IGNORE_INDEX)) for r in ds["labels"])
    assert sum(stats["sources"]["long"]["length_histogram"].values()) == 6
    assert stats["bytes_per_token"] <= 9


def test_two_processes_give_the_same_dataset(tmp_path, tiny_tokenizer_dir):
    rows = [messages(f"question {i} " * (i % 7 + 1), f"answer {i}", "again", f"sure {i}") for i in range(40)]
    outputs = []
    for num_proc in (1, 2):
        (tmp_path / str(num_proc)).mkdir()
        config = make_config(tmp_path / str(num_proc), tiny_tokenizer_dir, rows, rows[:5],
                             num_proc=num_proc, batch_size=8)
        run_pretokenize(config)
        outputs.append(load_rows(config.output_dir)[0].to_dict())
    assert outputs[0] == outputs[1]


def test_interrupted_write_leaves_no_dataset(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import datasets

    config = make_config(tmp_path, tiny_tokenizer_dir, [messages("a", "b")], [])
    real_save = datasets.Dataset.save_to_disk

    def save_then_crash(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)  # files are on disk: the crash comes mid-stage
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pretokenize(config)
    assert not Path(config.output_dir).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left either


@pytest.mark.integration
def test_cli_end_to_end_on_demo_data(tmp_path, capsys):
    """`python -m longalign.demo.data`, then pre_tokenize.py, through their mains in this process."""
    import pre_tokenize
    from longalign.demo import data as demo_data

    raw, out = tmp_path / "raw", tmp_path / "llama"
    demo_data.main(["--out", str(raw), "--num_long", "12", "--num_short", "20", "--vocab_size", "600"])
    capsys.readouterr()
    pre_tokenize.main(["--model", "chatglm", "--tokenizer", str(raw / "tokenizer"), "--long", str(raw / "long.jsonl"),
                       "--short", str(raw / "sharegpt.jsonl"), "--datanum", "10", "--max_length", "1024",
                       "--truncate", "left", "--num_proc", "2", "--output_dir", str(out)])
    printed = json.loads(capsys.readouterr().out)
    ds, stats = load_rows(out)
    assert printed["total"] == stats["total"]
    assert stats["sources"]["long"]["rows_read"] == 10 and stats["sources"]["short"]["rows_read"] == 20
    assert len(ds) == stats["total"]["kept"] > 0 and max(len(r) for r in ds["input_ids"]) <= 1024


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from longalign.remote_code import load_tokenizer

    with pytest.raises(OSError, match=r"cannot load tokenizer.*--tokenizer"):
        load_tokenizer(str(tmp_path / "no_tokenizer_here"))


@pytest.mark.subprocess
def test_cli_bad_datanum_and_missing_file_fail_clearly(tmp_path, tiny_tokenizer_dir):
    """`python pre_tokenize.py` as a command for the usage error's exit code 2; the missing file
    through the script's main in this process."""
    import pre_tokenize

    base = ["--model", "llama", "--tokenizer", tiny_tokenizer_dir, "--output_dir", str(tmp_path / "o")]
    result = subprocess.run([sys.executable, "pre_tokenize.py", *base, "--datanum", "ten"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--datanum must be" in result.stderr
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(f"short data file not found: {missing}")):
        pre_tokenize.main(base + ["--short", missing])
    assert not (tmp_path / "o").exists()


def test_shuffle_seed_mixes_long_and_short_rows_reproducibly(tmp_path, tiny_tokenizer_dir):
    """--shuffle_seed: the original mixes long and short rows (unseeded random.shuffle); the
    project keeps input order by default and shuffles with a seed when asked."""
    long_rows = [messages(f"long question {i}", f"long answer {i}") for i in range(5)]
    short_rows = [messages(f"short {i}", f"reply {i}") for i in range(4)]
    outputs = {}
    for seed in (None, 7, 7):
        (tmp_path / f"{seed}{len(outputs)}").mkdir()
        config = make_config(tmp_path / f"{seed}{len(outputs)}", tiny_tokenizer_dir, long_rows, short_rows,
                             shuffle_seed=seed)
        stats = run_pretokenize(config)
        assert stats["sources"]["long"]["kept"] == 5 and stats["config"]["shuffle_seed"] == seed
        outputs.setdefault(seed, []).append(load_rows(config.output_dir)[0]["input_ids"])
    in_order = outputs[None][0]
    permutation = np.random.default_rng(7).permutation(9)
    assert outputs[7][0] == outputs[7][1] == [in_order[i] for i in permutation]
    assert outputs[7][0] != in_order
