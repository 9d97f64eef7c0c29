"""--model_base_url: the candidate behind a loopback OpenAI-compatible server, in both suites."""
import json

import pytest
import yaml

from helpers.fake_openai_server import PROMPT_TOKENS, FakeOpenAIServer
from LongBench_Chat import eval as lbc_eval
from longalign.eval.prompt_formats import ChatFormat
from longalign.eval.generation import GenerationSettings, LocalModel, prepare_prompt
from longalign.eval.openai_api import AuthenticationFailed
from longalign.eval.prediction_keys import PredictionMismatch
from longalign.eval.served_model import ServedModel
from longalign.storage import read_jsonl
from Needle_test import pred as needle_pred, prompt as needle_prompt
from helpers.longbench_chat_data import DOC, N, QUERIES, write_data
from helpers.tiny_llama import save_tiny_llama

FAST_RETRY = ["--model_backoff_s", "0", "--model_max_attempts", "3"]


def run_served(tmp_path, server, *extra, model_name="served-7b"):
    return lbc_eval.main(["--model_base_url", server.base_url, "--model_name", model_name, "--max_length", "64",
                          "--max_new_tokens", "5", "--data_dir", str(tmp_path / "data"), "--expected_cases", str(N),
                          "--output_dir", str(tmp_path / "out"), "--stage", "predict", *FAST_RETRY, *extra])


def test_chat_api_without_tokenizer_truncates_by_characters(tmp_path):
    write_data(tmp_path / "data")
    with FakeOpenAIServer([("Q-", [{"status": 200, "content": "  served answer  "}])]) as server:
        stats = run_served(tmp_path, server)["predict"]
        sent = server.requests_to("/chat/completions")
    assert stats["predicted_now"] == N and len(sent) == N and not server.requests_to("/completions")
    first = sent[0]
    assert first["model"] == "served-7b" and (first["max_tokens"], first["temperature"], first["seed"]) == (5, 1.0, 42)
    assert "top_p" not in first  # the server's default unless --top_p
    prompt = DOC + QUERIES[0]
    assert first["messages"] == [{"role": "user", "content": prompt[:32] + prompt[-32:]}]
    records = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert records[0]["response"] == "served answer" and records[0]["prompt_tokens"] == PROMPT_TOKENS
    assert (records[0]["truncation_unit"], records[0]["query_length"], records[0]["kept_query_length"]) == (
        "characters", len(prompt), 64)
    settings = json.loads((tmp_path / "out" / "predictions.jsonl.settings.json").read_text())["settings"]
    assert settings["candidate"] == {"kind": "served", "base_url": server.base_url, "model_name": "served-7b",
                                     "api": "chat"}
    assert settings["chat_format"]["name"] == "server" and settings["tokenizer"] is None


def test_completions_api_sends_the_local_prompt(tmp_path, tiny_tokenizer_dir):
    """With the model's tokenizer, a served model reads exactly the text a local run would."""
    write_data(tmp_path / "data")
    local = LocalModel(save_tiny_llama(tiny_tokenizer_dir, tmp_path / "LongAlign-7B-64k"))
    with FakeOpenAIServer([("Q-", [{"status": 200, "content": "ok"}])]) as server:
        run_served(tmp_path, server, "--model_api", "completions", "--tokenizer", tiny_tokenizer_dir,
                   "--chat_format", "llama", "--top_p", "0.9")
        sent = server.requests_to("/completions")
    expected = prepare_prompt(DOC + QUERIES[0], ChatFormat("llama", "test"), local.tokenizer, 64)
    assert sent[0]["prompt"] == expected.text and expected.text.startswith("[INST]")
    assert sent[0]["top_p"] == 0.9
    local_record = local.respond(DOC + QUERIES[0], GenerationSettings(max_new_tokens=2, max_length=64, top_p=0.9))
    served_record = read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]
    same = ("truncation_unit", "query_length", "kept_query_length", "truncated")
    assert {k: served_record[k] for k in same} == {k: local_record[k] for k in same}
    assert set(local_record) == set(served_record) - {"idx", "settings_key", "prompt_sha256"}  # the same outputs


def test_failed_case_is_counted_and_retried_by_a_rerun(tmp_path):
    write_data(tmp_path / "data")
    rules = [("Q-BETA", [{"status": 500}, {"body": "<html>proxy error</html>", "content_type": "text/html"},
                         {"status": 503}, {"status": 200, "content": "late answer"}]),
             ("Q-", [{"status": 200, "content": "fine"}])]
    with FakeOpenAIServer(rules) as server:
        stats = run_served(tmp_path, server)["predict"]
        assert stats["predicted_now"] == N - 1 and list(stats["failed"]) == ["2"]
        assert "HTTP 503" in stats["failed"]["2"]
        again = run_served(tmp_path, server)["predict"]
    assert (again["already_done"], again["predicted_now"], again["failed"]) == (N - 1, 1, {})
    by_idx = {r["idx"]: r["response"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    assert by_idx[2] == "late answer" and len(by_idx) == N


def test_concurrent_requests_and_a_refused_key(tmp_path):
    write_data(tmp_path / "data")
    with FakeOpenAIServer([("Q-", [{"status": 200, "content": "echo"}])]) as server:
        stats = run_served(tmp_path, server, "--model_concurrency", "3")["predict"]
    assert stats["predicted_now"] == N
    records = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert sorted(r["idx"] for r in records) == list(range(1, N + 1))
    assert all(QUERIES[r["idx"] - 1][-10:] in r["response"] for r in records)  # each answer with its own case
    (tmp_path / "out").rename(tmp_path / "first")
    with FakeOpenAIServer([], default={"status": 401, "delay_s": 0.2}) as server:
        with pytest.raises(AuthenticationFailed, match="model server .* refused the API key"):
            run_served(tmp_path, server, "--model_concurrency", "2")
        assert len(server.requests) <= 2
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == []


@pytest.mark.parametrize("change", [["--model_api", "completions", "--chat_format", "llama"], ["--max_length", "32"]])
def test_served_settings_changes_are_refused(tmp_path, change):
    write_data(tmp_path / "data")
    with FakeOpenAIServer([("Q-", [{"status": 200, "content": "a"}])]) as server:
        run_served(tmp_path, server, "--lang", "zh")
        with pytest.raises(PredictionMismatch, match="made under other settings"):
            run_served(tmp_path, server, "--lang", "zh", *change)
        with pytest.raises(PredictionMismatch, match="candidate.model_name"):
            run_served(tmp_path, server, "--lang", "zh", model_name="another-model")


def test_chat_api_refuses_a_client_side_format(tmp_path):
    with pytest.raises(ValueError, match="--model_api completions"):
        ServedModel("http://127.0.0.1:9/v1", "m", chat_format="chatglm")
    with pytest.raises(ValueError, match="needs --model_name"):
        ServedModel("http://127.0.0.1:9/v1", "")


def test_needle_pred_through_a_served_chatglm_format(tmp_path, tiny_tokenizer_dir):
    """The chatglm prompt path end to end through the server."""
    haystack = tmp_path / "hay"
    haystack.mkdir()
    (haystack / "a.txt").write_text("Sentence about the river and the town. " * 200)
    (tmp_path / "config-prompt.yaml").write_text(yaml.safe_dump({
        "prompt": {"needle": "\nThe key is 42.\n", "haystack_dir": str(haystack), "retrieval_question": "Key?"},
        "context": {"list": [200]}, "document_depth": {"list": [0, 50]},
        "tokenizer": {"model_name": tiny_tokenizer_dir}, "final_context_buffer": 40, "save_dir": "prompts"}))
    needle_prompt.main(["--config", str(tmp_path / "config-prompt.yaml")])
    (tmp_path / "config-pred.yaml").write_text(yaml.safe_dump({
        "model": {"model_base_url": None, "model_name": "glm-served", "model_api": "completions",
                  "tokenizer": tiny_tokenizer_dir, "chat_format": "chatglm"},
        "generation": {"max_new_tokens": 7, "temperature": 0.1}, "prompt_dir": "prompts", "save_file": "preds.jsonl"}))
    with FakeOpenAIServer([("Key?", [{"status": 200, "content": "The key is 42."}])]) as server:
        stats = needle_pred.main(["--config", str(tmp_path / "config-pred.yaml"), "--model_base_url", server.base_url])
        sent = server.requests_to("/completions")
    assert stats["predicted_now"] == 2 and len(sent) == 2
    assert all(r["prompt"].startswith("[Round 1]\n\n问：") and r["prompt"].endswith("Key?\n\n答：") for r in sent)
    assert sent[0]["top_p"] == 0.8 and sent[0]["temperature"] == 0.1  # the original's ChatGLM sampling
    records = read_jsonl(tmp_path / "preds.jsonl")
    assert {r["model"] for r in records} == {"glm-served"} and {r["response"] for r in records} == {"The key is 42."}
