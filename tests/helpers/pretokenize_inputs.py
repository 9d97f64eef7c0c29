"""pre_tokenize's inputs and outputs in tests: conversations in the messages format, JSONL files, a
PretokenizeConfig over a long and a short file, and the written dataset with its stats."""
from __future__ import annotations

import json
from pathlib import Path

from longalign.data.tokenize_stage import STATS_FILE, PretokenizeConfig


def messages(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return str(path)


def make_config(tmp_path, tokenizer_dir, long_rows, short_rows, **overrides):
    values = dict(family="llama", tokenizer=tokenizer_dir,
                  long_path=write_jsonl(tmp_path / "long.jsonl", long_rows),
                  short_path=write_jsonl(tmp_path / "short.jsonl", short_rows),
                  datanum=10_000, max_length=4096, truncate="right", num_proc=1,
                  output_dir=str(tmp_path / "out"), batch_size=2)
    values.update(overrides)
    return PretokenizeConfig(**values)


def load_rows(out_dir):
    import datasets

    ds = datasets.load_from_disk(str(out_dir))
    return ds, json.loads((Path(out_dir) / STATS_FILE).read_text())
