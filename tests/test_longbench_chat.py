"""LongBench_Chat/: schema checks, download, resumable prediction with a tiny model, judged scoring."""
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fake_openai_server import PROMPT_TOKENS, COMPLETION_TOKENS, FakeOpenAIServer
from LongBench_Chat import check_data, eval as lbc_eval
from LongBench_Chat.lbc_data import DataError, download, load_data
from LongBench_Chat.lbc_score import detect_language, judge_messages
from longalign.storage import read_jsonl
from tiny_llama import save_tiny_llama

TEMPLATE = ("[Question] {}\n[Reference] {}\n[Answer] {}\nRating: [[{}]]\n[Answer] {}\nRating: [[{}]]\n"
            "[Answer] {}\nRating: [[{}]]\nRate this:\n[Answer] {}\nRating:")
QUERIES = ["Q-ALPHA what is the key?", "Q-BETA who wrote it?", "Q-GAMMA summarize.", "Q-DELTA 这篇文章讲了什么？"]
DOC = "The quick brown fox jumps over the lazy dog. " * 40


def write_data(data_dir, cases=None, few_shots=None, template=TEMPLATE):
    data_dir.mkdir(parents=True, exist_ok=True)
    if cases is None:
        cases = [{"idx": i + 1, "query": q, "prompt": DOC + q, "answer": f"reference {i + 1}"}
                 for i, q in enumerate(QUERIES)]
    if few_shots is None:
        few_shots = [[{"answer": f"shot {c['idx']}-{k}", "score": k + 2} for k in range(3)] for c in cases]
    (data_dir / "test_cases.json").write_text(json.dumps(cases, ensure_ascii=False))
    (data_dir / "few_shots.json").write_text(json.dumps(few_shots, ensure_ascii=False))
    (data_dir / "prompt_fs.txt").write_text(template)
    return data_dir


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("lbc_model"))


def test_schema_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="download.py"):
        load_data(tmp_path / "nothing")
    bad_idx = [{"idx": 2, "query": "q", "prompt": "p", "answer": "a"}]
    with pytest.raises(DataError, match="idx 2, expected 1"):
        load_data(write_data(tmp_path / "a", cases=bad_idx))
    no_answer = [{"idx": 1, "query": "q", "prompt": "p"}]
    with pytest.raises(DataError, match="no field 'answer'"):
        load_data(write_data(tmp_path / "b", cases=no_answer))
    with pytest.raises(DataError, match="list of 4 entries"):
        load_data(write_data(tmp_path / "c", few_shots=[]))
    shots = [[{"answer": "x", "score": "high"}] * 3] * 4
    with pytest.raises(DataError, match="expected a number"):
        load_data(write_data(tmp_path / "d", few_shots=shots))
    with pytest.raises(DataError, match="9 positional"):
        load_data(write_data(tmp_path / "e", template="{} {}"))
    assert check_data.main(["--data_dir", str(tmp_path / "e")]) == 1
    assert check_data.main(["--data_dir", str(write_data(tmp_path / "ok"))]) == 0


def test_download_from_local_http_server(tmp_path):
    source = write_data(tmp_path / "release")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(source))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        report = download(tmp_path / "got", base_url=base)
        assert sorted(report["downloaded"]) == ["few_shots.json", "prompt_fs.txt", "test_cases.json"]
        assert report["cases"] == 4
        assert download(tmp_path / "got", base_url=base)["kept"] == ["test_cases.json", "few_shots.json",
                                                                     "prompt_fs.txt"]
        (source / "few_shots.json").unlink()
        with pytest.raises(DataError, match="could not download"):
            download(tmp_path / "other", base_url=base)
    finally:
        server.shutdown()
        server.server_close()


def test_language_and_judge_prompt():
    assert detect_language("What does the paper propose?") == "en"
    assert detect_language("这篇论文提出了什么方法？") == "zh"
    case = {"idx": 3, "query": "Q?", "answer": "REF", "prompt": "LONG DOCUMENT"}
    shots = [{"answer": f"A{k}", "score": k} for k in range(3)]
    run0 = judge_messages(TEMPLATE, case, shots, "PRED", 0)
    assert run0 == judge_messages(TEMPLATE, case, shots, "PRED", 0)  # same prompt on a rerun
    user = run0[1]["content"]
    assert "LONG DOCUMENT" not in user and user.startswith("[Question] Q?\n[Reference] REF")
    assert user.endswith("[Answer] PRED\nRating:")
    for k in range(3):
        assert f"[Answer] A{k}\nRating: [[{k}]]" in user
    orders = {tuple(m[1]["content"].index(f"A{k}") for k in range(3))
              for m in (judge_messages(TEMPLATE, case, shots, "PRED", run) for run in range(8))}
    assert len(orders) > 1  # the example order is shuffled across runs


def run_eval(tmp_path, model, *extra):
    return lbc_eval.main(["--model", model, "--max_length", "64", "--max_new_tokens", "4",
                          "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                          "--judge_backoff_s", "0", *extra])


def test_predict_resumes_after_a_crash(tmp_path, tiny_llama_dir, monkeypatch):
    import longalign.generation as generation

    write_data(tmp_path / "data")
    real, calls = generation.generate_response, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_response", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(tmp_path, tiny_llama_dir, "--stage", "predict")
    path = tmp_path / "out" / "predictions.jsonl"
    first = read_jsonl(path)
    assert [r["idx"] for r in first] == [1, 2]
    with open(path, "a") as f:
        f.write('{"idx": 3, "respo')  # a line torn by a kill mid-write
    monkeypatch.setattr(generation, "generate_response", real)
    stats = run_eval(tmp_path, tiny_llama_dir, "--stage", "predict")["predict"]
    assert (stats["already_done"], stats["predicted_now"]) == (2, 2) and stats["torn_bytes_dropped"] == 17
    records = read_jsonl(path)
    assert sorted(r["idx"] for r in records) == [1, 2, 3, 4]
    assert records[:2] == first
    assert all(r["truncated"] and r["kept_query_tokens"] == 64 for r in records)


def test_score_with_loopback_judge(tmp_path, tiny_llama_dir, monkeypatch):
    write_data(tmp_path / "data")
    run_eval(tmp_path, tiny_llama_dir, "--stage", "predict")
    rules = [("Q-ALPHA", [{"status": 200, "content": "Good. [[8]]"}]),
             ("Q-BETA", [{"status": 429}, {"status": 200, "content": "e.g. [[5]]. Verdict: [[6]]"}]),
             ("Q-GAMMA", [{"status": 500}, {"status": 500}, {"status": 200, "content": "[[4]]"}]),
             ("Q-DELTA", [{"status": 200, "content": "无法评分"}])]
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAIServer(rules) as server:
        summary = run_eval(tmp_path, tiny_llama_dir, "--stage", "score", "--runs", "2", "--concurrency", "2",
                           "--judge_base_url", server.base_url, "--judge_model", "judge-x")["score"]
        first_requests = len(server.requests)
        again = run_eval(tmp_path, tiny_llama_dir, "--stage", "score", "--runs", "2",
                         "--judge_base_url", server.base_url, "--judge_model", "judge-x")["score"]
        rerun_requests = len(server.requests) - first_requests
    assert summary["mean_score"] == pytest.approx((8 + 6 + 4) / 3)
    assert summary["mean_score_en"] == pytest.approx(6) and summary["mean_score_zh"] is None
    assert (summary["cases_en"], summary["cases_zh"]) == (3, 1)
    assert summary["missing_judgements"] == 2 and summary["missing_cases"] == 1
    scripted_errors = 3  # one 429 (Q-BETA) and two 500s (Q-GAMMA): no usage in those replies
    assert first_requests == 2 + 3 + 4 + 2 * 3
    assert summary["judge_tokens"] == (first_requests - scripted_errors) * (PROMPT_TOKENS + COMPLETION_TOKENS)
    assert all(r["model"] == "judge-x" and r["temperature"] == 0 for r in server.requests)
    assert rerun_requests == 2 * 3  # only the two unrated Q-DELTA judgements are asked again
    assert again["mean_score"] == summary["mean_score"]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    delta = next(r for r in scores if r["idx"] == 4)
    assert delta["score"] is None and delta["runs"][0]["judge_text"] == "无法评分"
    assert "no [[rating]]" in delta["runs"][0]["error"]
    row = (tmp_path / "out" / "leaderboard.md").read_text().splitlines()[-1]
    assert row.startswith(f"| {tiny_llama_dir} | 6.00 | 6.00 | – | 3 / 4 | 2 |")
