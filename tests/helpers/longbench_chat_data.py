"""A small LongBench-Chat data folder (test_cases.json, few_shots.json, prompt_fs.txt): four cases on
one document, in English and Chinese, with a judge template of the official shape."""
from __future__ import annotations

import json

TEMPLATE_TEXT = ("[Question] {}\n[Reference] {}\n[Answer] {}\nRating: [[{}]]\n[Answer] {}\nRating: [[{}]]\n"
                 "[Answer] {}\nRating: [[{}]]\nRate this:\n[Answer] {}\nRating:")
QUERIES = ["Q-ALPHA what is the key?", "Q-BETA who wrote it?", "Q-GAMMA summarize.", "Q-DELTA 这篇文章讲了什么？"]
DOC = "The quick brown fox jumps over the lazy dog. " * 40
N = len(QUERIES)


def make_cases():
    return [{"idx": i + 1, "query": q, "prompt": DOC + q, "answer": f"reference {i + 1}"} for i, q in enumerate(QUERIES)]


def write_data(data_dir, cases=None, few_shots=None, template=TEMPLATE_TEXT):
    data_dir.mkdir(parents=True, exist_ok=True)
    cases = make_cases() if cases is None else cases
    if few_shots is None:
        few_shots = [[{"answer": f"shot {c['idx']}-{k}", "score": k + 2} for k in range(3)] for c in cases]
    (data_dir / "test_cases.json").write_text(json.dumps(cases, ensure_ascii=False))
    (data_dir / "few_shots.json").write_text(json.dumps(few_shots, ensure_ascii=False))
    (data_dir / "prompt_fs.txt").write_text(template)
    return data_dir
