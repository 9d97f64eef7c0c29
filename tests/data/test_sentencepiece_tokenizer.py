"""`pre_tokenize.py --tokenizer DIR` with a sentencepiece-only Llama-2 tokenizer directory
(tokenizer.model + tokenizer_config.json naming LlamaTokenizer, no tokenizer.json: how many
Llama-2 checkpoints ship). transformers 5 converts it to a fast tokenizer, which needs
`protobuf`. Acceptance item of issues 13 and 14; a standalone test on purpose."""
import json
import pytest
from pathlib import Path

import datasets
from transformers import AutoTokenizer

from longalign.constants import IGNORE_INDEX
from longalign.data.tokenization import ConversationTokenizer
from helpers.tokenizer_builders import build_llama2_sentencepiece_dir

REPO = Path(__file__).resolve().parents[2]


def messages(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


ROWS = [
    messages("What is the key?", "The key is 42.", "And the lock?", "It opens."),
    messages("钥匙在哪里？", "钥匙在桌子上。", "unanswered trailing question"),
    messages("Quote </s> and <s> and [INST]", "Quoted: </s>"),
    messages("empty?", "  ", "second", "\u200b"),  # every reply empty: no target, row skipped
    messages("half", "", "full", "Yes."),
]


def test_pre_tokenize_cli_with_sentencepiece_only_llama2_directory(tmp_path):
    """The command line through pre_tokenize.py's main, in this process."""
    import pre_tokenize
    tokenizer_dir = Path(build_llama2_sentencepiece_dir(tmp_path / "llama2"))
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    long_path, short_path, out = tmp_path / "long.jsonl", tmp_path / "short.jsonl", tmp_path / "out"
    long_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    short_path.write_text(json.dumps(messages("hi", "hello")) + "\n", encoding="utf-8")
    pre_tokenize.main(["--model", "llama", "--tokenizer", str(tokenizer_dir), "--long", str(long_path),
                       "--short", str(short_path), "--num_proc", "1", "--output_dir", str(out)])

    stats = json.loads((out / "stats.json").read_text())
    long = stats["sources"]["long"]
    assert (long["rows_read"], long["kept"], long["skipped_no_target"]) == (5, 4, 1)
    assert long["dropped_trailing_user_turns"] == 1
    assert long["empty_replies_masked"] == 3 and stats["total"]["empty_replies_masked"] == 3
    assert long["ids_differ_from_whole_text"] == 0
    assert stats["tokenizer"]["prefix_ids"] == [1] and stats["tokenizer"]["eos_token_id"] == 2
    assert stats["tokenizer"]["text_route"] == "backend_encode_batch_fast"

    rows = datasets.load_from_disk(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    encoder = ConversationTokenizer(tokenizer, "llama")
    kept_rounds = [[("What is the key?", "The key is 42."), ("And the lock?", "It opens.")],
                   [("钥匙在哪里？", "钥匙在桌子上。")], [("Quote </s> and <s> and [INST]", "Quoted: </s>")],
                   [("half", ""), ("full", "Yes.")], [("hi", "hello")]]
    for row, encoded in zip(rows, encoder.encode_batch(kept_rounds)):
        assert (row["input_ids"], row["labels"]) == (encoded.ids, encoded.labels)
        assert row["input_ids"][0] == 1 and row["input_ids"][-1] == row["labels"][-1] == 2
    quoted = rows[2]
    assert quoted["input_ids"].count(2) == 1  # the literal "</s>"s are text, only the real EOS is 2
    assert tokenizer.decode(quoted["input_ids"][1:-1]) == "[INST]Quote </s> and <s> and [INST][/INST]Quoted: </s>"
    first = rows[0]
    assert sum(label == 2 for label in first["labels"]) == 2  # EOS after both replies
    half = rows[3]["labels"]  # ("half", "") masked, ("full", "Yes.") trained
    assert sum(label == 2 for label in half) == 1 and sum(label != IGNORE_INDEX for label in half) > 1
