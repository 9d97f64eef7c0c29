"""Record expected.json: the ids and labels pre_tokenize wrote for sample.jsonl before system turns
and other input formats were supported (recorded on commit 7a6ec05). tests/data/test_input_formats.py
checks that data without system turns still tokenizes to exactly these ids.

    PYTHONPATH=.:tests python tests/data/ids_before_system_turns/record.py

The tokenizers are stored here (byte_level/: the tests' tiny byte-level BPE; sentencepiece/: the
Llama-2-style tokenizer.model of tests/helpers/tokenizer_builders.py), so the ids do not depend on how a
later `tokenizers` or `sentencepiece` version would train them.
"""
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "sample.jsonl"
EXPECTED = HERE / "expected.json"
MAX_LENGTH = 96
MODES = ("right", "left")
# (case name, tokenizer folder, family); "chatglm3_like" is the python ChatGLM3-shaped tokenizer
PATH_CASES = (("byte_level_llama", "byte_level", "llama"), ("byte_level_chatglm", "byte_level", "chatglm"),
              ("sentencepiece_llama", "sentencepiece", "llama"))


def _rows():
    def messages(*turns):
        return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}

    fox = "The quick brown fox jumps over the lazy dog. "
    return [
        messages("What is the key?", "The key is 42."),
        messages("你好，钥匙在哪里？", "钥匙在桌子上。", "And the lock?", ".lock opens"),
        messages("Quote: </s> <s> [INST] [/INST] [gMASK] sop <|user|> end", "It says </s> and <|system|>."),
        messages("q1", "", "q2", "  \n ", "q3", "The key is 42."),
        messages("  padded question \n", "\n  He\u200bllo  \n\n", "unanswered"),
        messages("Summarize: " + fox * 12, fox * 3),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "id": "extra keys are ignored"},
    ]


def chatglm3_like_rows(mode: str) -> list:
    from helpers.tokenizer_builders import ChatGLM3LikeTokenizer

    from longalign.data.conversations import read_jsonl
    from longalign.data.tokenization import ConversationTokenizer, finish_example

    tokenizer = ChatGLM3LikeTokenizer(str(HERE / "sentencepiece" / "tokenizer.model"))
    conversations = [row.rounds for row in read_jsonl(SAMPLE).rows]
    encoded = ConversationTokenizer(tokenizer, "chatglm").encode_batch(conversations)
    examples = [finish_example(e, MAX_LENGTH, mode) for e in encoded]
    return [{"input_ids": e.input_ids.tolist(), "labels": e.labels.tolist()} for e in examples
            if e.input_ids is not None]


def path_rows(tokenizer: str, family: str, mode: str, scratch: Path) -> list:
    import datasets

    from longalign.data.tokenize_stage import PretokenizeConfig, run_pretokenize

    empty = scratch / "empty.jsonl"
    empty.write_text("")
    out = scratch / f"{tokenizer}-{family}-{mode}"
    run_pretokenize(PretokenizeConfig(family=family, tokenizer=str(HERE / tokenizer), long_path=str(SAMPLE),
                                      short_path=str(empty), datanum=100, max_length=MAX_LENGTH, truncate=mode,
                                      num_proc=1, output_dir=str(out)))
    return datasets.load_from_disk(str(out)).to_dict()


def main() -> None:
    SAMPLE.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in _rows()), encoding="utf-8")
    expected = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in MODES:
            for name, tokenizer, family in PATH_CASES:
                rows = path_rows(tokenizer, family, mode, Path(scratch))
                expected[f"{name}/{mode}"] = [{"input_ids": i, "labels": l}
                                              for i, l in zip(rows["input_ids"], rows["labels"])]
            expected[f"chatglm3_like_chatglm/{mode}"] = chatglm3_like_rows(mode)
    EXPECTED.write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    print(f"wrote {EXPECTED}: {', '.join(f'{k} {len(v)} rows' for k, v in expected.items())}", file=sys.stderr)


if __name__ == "__main__":
    main()
