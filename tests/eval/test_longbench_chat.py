"""LongBench_Chat/: data checks and download, keyed and resumable prediction (local and served),
judged scoring against a loopback server, comparability fields of the summary."""
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers.fake_openai_server import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAIServer
from LongBench_Chat import check_data, eval as lbc_eval
from longalign.eval.longbench_chat.data import OFFICIAL_SHA256, TEMPLATE, DataError, download, load_data
from longalign.eval.longbench_chat.run import MAX_NAME_CHARS, model_save_name
from longalign.eval.longbench_chat.score import detect_language, judge_messages, select_cases
from longalign.eval.openai_api import AuthenticationFailed
from longalign.eval.prediction_keys import PredictionMismatch
from longalign.storage import read_jsonl
from helpers.line_separators import LINE_SEPARATORS
from helpers.longbench_chat_data import N, TEMPLATE_TEXT, make_cases, write_data
from helpers.tiny_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("lbc_model"))


def test_schema_problems_are_all_listed(tmp_path):
    with pytest.raises(DataError, match="download.py"):
        load_data(tmp_path / "nothing")
    with pytest.raises(DataError, match="4 cases, expected 50"):  # the official release has 50
        load_data(write_data(tmp_path / "small"))
    assert load_data(tmp_path / "small", expected_cases=N).cases[0]["idx"] == 1
    cases = make_cases()
    cases[1]["idx"] = 7
    del cases[2]["answer"]
    shots = [[{"answer": "x", "score": 5}] * 3 for _ in range(N)]
    shots[0][1] = {"answer": "", "score": 5}
    shots[3][2] = {"answer": "y", "score": 11}
    with pytest.raises(DataError) as err:
        load_data(write_data(tmp_path / "bad", cases=cases, few_shots=shots, template="{} {}"), expected_cases=N)
    message = str(err.value)
    for part in ("5 problem(s)", "case #1 has idx 7, expected 2", "case #2 has no field 'answer'",
                 "idx 1 shot 1 has no answer text", "idx 4 shot 2 has score 11", "9 positional"):
        assert part in message, part
    (tmp_path / "bad" / "test_cases.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    (tmp_path / "bad" / "few_shots.json").write_text("<!DOCTYPE html><html>404</html>")
    with pytest.raises(DataError, match="Git LFS pointer") as err:
        load_data(tmp_path / "bad")
    assert "an HTML page" in str(err.value)
    assert check_data.main(["--data_dir", str(tmp_path / "bad")]) == 1
    assert check_data.main(["--data_dir", str(tmp_path / "small"), "--expected_cases", str(N)]) == 0


def serve_folder(folder):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_download_checks_before_writing(tmp_path):
    source = write_data(tmp_path / "release")
    server, base = serve_folder(source)
    try:
        with pytest.raises(DataError, match="4 cases, expected 50.*nothing was written|nothing was written"):
            download(tmp_path / "got", base_url=base)
        assert not (tmp_path / "got").exists()
        report = download(tmp_path / "got", base_url=base, expected_cases=N)
        assert sorted(report["downloaded"]) == ["few_shots.json", "prompt_fs.txt", "test_cases.json"]
        assert report["cases"] == N and report["files"][TEMPLATE]["official"] is False
        assert download(tmp_path / "got", base_url=base, expected_cases=N)["kept"] == [
            "test_cases.json", "few_shots.json", "prompt_fs.txt"]
        (source / "few_shots.json").write_text("[]")
        with pytest.raises(DataError, match="few_shots.json: expected a list of 4 entries"):
            download(tmp_path / "got", base_url=base, overwrite=True, expected_cases=N)
        assert json.loads((tmp_path / "got" / "few_shots.json").read_text())  # the good copy is untouched
        (source / "few_shots.json").unlink()
        with pytest.raises(DataError, match="could not download"):
            download(tmp_path / "other", base_url=base, expected_cases=N)
    finally:
        server.shutdown()
        server.server_close()


def test_language_prompt_and_subsets():
    assert detect_language("What does the paper propose?") == "en"
    assert detect_language("这篇论文提出了什么方法？") == "zh"
    assert [c["idx"] for c in select_cases(make_cases(), "en")] == [1, 2, 3]
    assert [c["idx"] for c in select_cases(make_cases(), "zh")] == [4]
    case = {"idx": 3, "query": "Q?", "answer": "REF", "prompt": "LONG DOCUMENT"}
    shots = [{"answer": f"A{k}", "score": k} for k in range(3)]
    run0 = judge_messages(TEMPLATE_TEXT, case, shots, "PRED\nline two", 0)
    assert run0 == judge_messages(TEMPLATE_TEXT, case, shots, "PRED\nline two", 0)  # same prompt on a rerun
    user = run0[1]["content"]
    assert "LONG DOCUMENT" not in user and user.startswith("[Question] Q?\n[Reference] REF")
    assert user.endswith("[Answer] PRED line two\nRating:")  # newlines to spaces, as the original
    for k in range(3):
        assert f"[Answer] A{k}\nRating: [[{k}]]" in user
    orders = {tuple(m[1]["content"].index(f"A{k}") for k in range(3))
              for m in (judge_messages(TEMPLATE_TEXT, case, shots, "PRED", run) for run in range(8))}
    assert len(orders) > 1  # the example order is shuffled across runs


def run_eval(tmp_path, *extra, out="out"):
    argv = ["--max_length", "64", "--max_new_tokens", "4", "--data_dir", str(tmp_path / "data"),
            "--expected_cases", str(N), "--judge_backoff_s", "0", *extra]
    if out is not None:
        argv += ["--output_dir", str(tmp_path / out)]
    return lbc_eval.main(argv)


def test_predict_resumes_after_a_crash(tmp_path, tiny_llama_dir, monkeypatch):
    from longalign.eval.generation import LocalModel

    write_data(tmp_path / "data")
    real, calls = LocalModel.respond, []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalModel, "respond", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict")
    path = tmp_path / "out" / "predictions.jsonl"
    first = read_jsonl(path)
    assert [r["idx"] for r in first] == [1, 2]
    with open(path, "a") as f:
        f.write('{"idx": 3, "respo')  # a line torn by a kill mid-write
    monkeypatch.setattr(LocalModel, "respond", real)
    stats = run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict")["predict"]
    assert (stats["already_done"], stats["predicted_now"]) == (2, 2) and stats["torn_bytes_dropped"] == 17
    records = read_jsonl(path)
    assert sorted(r["idx"] for r in records) == [1, 2, 3, 4] and records[:2] == first
    assert all(r["truncated"] and r["kept_query_length"] == 64 for r in records)
    assert len({r["settings_key"] for r in records}) == 1 and all(len(r["prompt_sha256"]) == 64 for r in records)
    settings = json.loads((tmp_path / "out" / "predictions.jsonl.settings.json").read_text())["settings"]
    assert settings["chat_format"]["name"] == "llama" and settings["truncation"] == {"max_length": 64,
                                                                                     "unit": "tokens"}


@pytest.mark.parametrize("change", [["--temperature", "0.5"], ["--max_length", "32"], ["--seed", "1"],
                                    ["--max_new_tokens", "3"], ["--chat_format", "chatglm"], ["--top_p", "0.9"],
                                    "other_model"])
def test_rerun_with_a_changed_setting_is_refused(tmp_path, tiny_llama_dir, tiny_tokenizer_dir, change):
    """The audit: another --model/--max_length/--temperature into the same folder reused the predictions."""
    write_data(tmp_path / "data")
    run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh")
    if change == "other_model":  # same architecture and tokenizer, other weights
        change = ["--model", save_tiny_llama(tiny_tokenizer_dir, tmp_path / "LongAlign-7B-other", seed=1)]
    before = (tmp_path / "out" / "predictions.jsonl").read_text()
    with pytest.raises(PredictionMismatch, match="made under other settings") as err:
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh", *change)
    assert "->" in str(err.value) and "another --output_dir" in str(err.value)
    with pytest.raises(PredictionMismatch):
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "score", "--lang", "zh", *change)
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == before  # nothing touched


def test_default_output_folder_is_keyed_by_the_settings(tmp_path, tiny_llama_dir, monkeypatch):
    write_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    first = run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh", out=None)
    second = run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh",
                      "--temperature", "0.5", out=None)
    assert first["predict"]["predicted_now"] == second["predict"]["predicted_now"] == 1
    folders = sorted(p.parent for p in tmp_path.glob("outputs/longbench_chat/*/*/predictions.jsonl"))
    assert len(folders) == 2 and {p.name for p in folders} == {first["predict"]["settings_key"][:12],
                                                                 second["predict"]["settings_key"][:12]}


def test_unkeyed_duplicate_and_stale_records_are_refused(tmp_path, tiny_llama_dir):
    write_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text('{"idx": 4, "response": "old format"}\n')
    with pytest.raises(PredictionMismatch, match="no predictions.jsonl.settings.json"):
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh")
    (out / "predictions.jsonl").unlink()
    run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh")
    line = (out / "predictions.jsonl").read_text()
    (out / "predictions.jsonl").write_text(line + line)
    with pytest.raises(PredictionMismatch, match="predictions.jsonl:2: duplicate idx 4 \\(also line 1\\)"):
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "score", "--lang", "zh")
    (out / "predictions.jsonl").write_text(line)
    cases = make_cases()
    cases[3]["prompt"] += " (a new version of the document)"
    write_data(tmp_path / "data", cases=cases)
    with pytest.raises(PredictionMismatch, match="the prompt of idx 4 changed"):
        run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict", "--lang", "zh")


def test_score_with_loopback_judge(tmp_path, tiny_llama_dir, monkeypatch):
    write_data(tmp_path / "data")
    run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict")
    rules = [("Q-ALPHA", [{"status": 200, "content": "Good. [[8]]"}]),
             ("Q-BETA", [{"status": 429}, {"status": 200, "content": "e.g. [[5]]. Verdict: [[6]]"}]),
             ("Q-GAMMA", [{"status": 500}, {"body": "<html>bad gateway</html>", "content_type": "text/html"},
                          {"status": 200, "content": "[[4]]"}]),
             ("Q-DELTA", [{"status": 200, "content": "For example \"Rating: [[5]]\". My rating: [[-1]]"}])]
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    judge = ["--model", tiny_llama_dir, "--stage", "score", "--runs", "2", "--judge_base_url", None,
             "--judge_model", "judge-x"]
    with FakeOpenAIServer(rules) as server:
        judge[judge.index(None)] = server.base_url
        summary = run_eval(tmp_path, *judge, "--concurrency", "2")["score"]
        first_requests = len(server.requests)
        again = run_eval(tmp_path, *judge)["score"]
        rerun_requests = len(server.requests) - first_requests
    assert summary["mean_score"] == pytest.approx((8 + 6 + 4) / 3)
    assert summary["mean_score_en"] == pytest.approx(6) and summary["mean_score_zh"] is None
    assert (summary["cases_en"], summary["cases_zh"]) == (3, 1)
    assert summary["missing_judgements"] == 2 and summary["missing_cases"] == 1
    failed_attempts = 3  # one 429 (Q-BETA), a 500 and an HTML page (Q-GAMMA): no usage counted
    assert first_requests == 2 + 3 + 4 + 2 * 3
    assert summary["judge_tokens"] == (first_requests - failed_attempts) * (PROMPT_TOKENS + COMPLETION_TOKENS)
    assert all(r["model"] == "judge-x" and r["temperature"] == 0 for r in server.requests)
    assert rerun_requests == 2 * 3  # only the two unrated Q-DELTA judgements are asked again
    assert again["mean_score"] == summary["mean_score"]
    delta = next(r for r in json.loads((tmp_path / "out" / "scores.json").read_text()) if r["idx"] == 4)
    assert delta["score"] is None and "no [[rating]]" in delta["runs"][0]["error"]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (saved["judge_model"], saved["runs"], saved["lang"], saved["model"]) == ("judge-x", 2, "all", tiny_llama_dir)
    assert saved["judge_prompt_sha256"] != OFFICIAL_SHA256[TEMPLATE] and saved["judge_prompt_official"] is False
    assert saved["prediction_settings"]["generation"]["temperature"] == 1.0
    row = (tmp_path / "out" / "leaderboard.md").read_text().splitlines()[-1]
    assert row.startswith(f"| {tiny_llama_dir} | 6.00 | 6.00 | – | all | 3 / 4 | 2 | judge-x | 2 | "
                          f"{saved['judge_prompt_sha256'][:12]} (NOT official) | llama |")


def test_english_subset_and_judge_timeout_flag(tmp_path, tiny_llama_dir, monkeypatch):
    write_data(tmp_path / "data")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    rules = [("Q-ALPHA", [{"status": 200, "content": "[[9]]", "delay_s": 5}])]
    with FakeOpenAIServer(rules, default={"status": 200, "content": "[[3]]"}) as server:
        out = run_eval(tmp_path, "--model", tiny_llama_dir, "--lang", "en", "--runs", "1",
                       "--judge_base_url", server.base_url, "--judge_timeout_s", "0.3", "--judge_max_attempts", "2")
        assert not any("Q-DELTA" in r["messages"][-1]["content"] for r in server.requests)
    assert out["predict"]["cases"] == 3 and len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 3
    summary = out["score"]
    assert (summary["lang"], summary["cases"], summary["scored_cases"], summary["missing_judgements"]) == ("en", 3, 2, 1)
    assert summary["mean_score"] == 3.0 and "| en | 2 / 3 | 1 |" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_authentication_error_stops_scoring(tmp_path, tiny_llama_dir, monkeypatch):
    write_data(tmp_path / "data")
    run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "predict")
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with FakeOpenAIServer([], default={"status": 401, "delay_s": 0.1}) as server:
        with pytest.raises(AuthenticationFailed, match="refused the API key"):
            run_eval(tmp_path, "--model", tiny_llama_dir, "--stage", "score", "--runs", "6", "--concurrency", "2",
                     "--judge_base_url", server.base_url)
        assert len(server.requests) <= 2  # of 24 judgements


@pytest.mark.parametrize("separator", LINE_SEPARATORS)
def test_a_line_separator_in_answers_and_judge_replies_resumes(tmp_path, monkeypatch, separator):
    """The audit: an answer or judge reply with U+2028 cut its record in two: the run failed, and every
    later resume and score of the folder."""
    write_data(tmp_path / "data")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    answer = f"first line{separator}second line"
    with FakeOpenAIServer([], default={"status": 200, "content": answer}) as model, \
            FakeOpenAIServer([], default={"status": 200, "content": f"Fine.{separator}Rating: [[7]]"}) as judge:
        served = ["--model_base_url", model.base_url, "--model_name", "served", "--judge_base_url", judge.base_url,
                  "--runs", "1"]
        run_eval(tmp_path, *served, "--stage", "predict", "--lang", "zh")  # 1 case, then resumed
        first = run_eval(tmp_path, *served)
        again = run_eval(tmp_path, *served)
        asked = (len(model.requests), len(judge.requests))
    assert (first["predict"]["already_done"], again["predict"]["already_done"]) == (1, N)
    assert asked == (N, N)  # every answer and judgement read back, none asked twice
    assert first["score"]["mean_score"] == again["score"]["mean_score"] == 7.0
    assert [r["response"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")] == [answer] * N


@pytest.mark.parametrize("name", ["..", ".", "../..", "../../etc/x", "a/../../b", "/abs/path/model", "~", "-",
                                  "..\\..\\x", "名前", "m" * 300, "org/" + "n" * 300])
def test_folder_names_from_model_names_stay_one_folder(name):
    """The audit: --model_name .. wrote the default output folder outside outputs/longbench_chat/."""
    folder = model_save_name(name)
    assert folder not in (".", "..") and "/" not in folder and "\\" not in folder
    assert folder[0] not in ".-" and len(folder) <= MAX_NAME_CHARS
    assert model_save_name("org/" + "n" * 300) != model_save_name("org/" + "n" * 299)  # a long name keeps a hash


def test_default_output_folder_of_a_dotted_model_name_is_under_the_root(tmp_path, monkeypatch):
    write_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with FakeOpenAIServer([], default={"status": 200, "content": "ok"}) as model:
        stats = run_eval(tmp_path, "--model_base_url", model.base_url, "--model_name", "..", "--stage", "predict",
                         "--lang", "zh", out=None)["predict"]
    (written,) = tmp_path.rglob("predictions.jsonl")
    assert written.parent == tmp_path / "outputs" / "longbench_chat" / "model" / stats["settings_key"][:12]
