"""longalign.judge against a real loopback chat-completions server (tests/fake_openai_server.py)."""
import pytest

from fake_openai_server import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAIServer
from longalign.judge import Judge, JudgeConfigError, RetryPolicy, judgement_key, parse_rating
from longalign.storage import read_jsonl

TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS


def make_judge(server, tmp_path=None, **retry):
    waits = []
    judge = Judge(model="gpt-4", base_url=server.base_url, api_key="test-key",
                  cache_path=None if tmp_path is None else tmp_path / "cache.jsonl",
                  retry=RetryPolicy(backoff_s=0.01, **retry), sleep=waits.append)
    return judge, waits


def ask(text):
    return [{"role": "user", "content": text}]


def test_parse_rating_takes_last_in_range():
    assert parse_rating('format "[[rating]]", e.g. [[5]]. My verdict: [[8]]') == 8
    assert parse_rating("Rating: [[ 7 ]]") == 7
    assert parse_rating("no rating here") is None
    assert parse_rating("[[11]]") is None
    assert parse_rating("[[0]]") is None
    assert parse_rating("[[2.5]]") == 2.5


def test_good_rating_and_cache(tmp_path):
    with FakeOpenAIServer([("case-a", [{"status": 200, "content": "ok [[3]] then [[9]]"}])]) as server:
        judge, _ = make_judge(server, tmp_path)
        first = judge.judge(ask("case-a"), "k1")
        assert (first.rating, first.attempts, first.tokens, first.cached) == (9, 1, TOKENS, False)
        assert server.requests[0]["temperature"] == 0
        assert server.requests[0]["model"] == "gpt-4"
        again = Judge(model="gpt-4", base_url=server.base_url, api_key="x", cache_path=tmp_path / "cache.jsonl")
        second = again.judge(ask("case-a"), "k1")
        assert second.cached and second.rating == 9
        assert len(server.requests) == 1  # the cached one was not asked again
    assert [r["key"] for r in read_jsonl(tmp_path / "cache.jsonl")] == ["k1"]


def test_429_and_500_are_retried_with_backoff():
    script = [{"status": 429}, {"status": 500}, {"status": 200, "content": "[[6]]"}]
    with FakeOpenAIServer([("flaky", script)]) as server:
        judge, waits = make_judge(server)
        result = judge.judge(ask("flaky"), "k")
    assert result.rating == 6 and result.attempts == 3 and result.error is None
    assert len(server.requests) == 3
    assert waits == [0.0, 0.02]  # Retry-After: 0 of the 429, then the doubled backoff


def test_no_rating_retried_then_missing_not_zero(tmp_path):
    with FakeOpenAIServer([("mute", [{"status": 200, "content": "I cannot rate this."}])]) as server:
        judge, _ = make_judge(server, tmp_path, max_unrated=3)
        result = judge.judge(ask("mute"), "k")
    assert result.rating is None and "no [[rating]]" in result.error
    assert result.attempts == 3 and result.tokens == 3 * TOKENS
    assert result.text == "I cannot rate this."
    assert read_jsonl(tmp_path / "cache.jsonl") == []  # a missing rating is asked again next run


def test_persistent_errors_give_missing_after_max_attempts():
    with FakeOpenAIServer([("down", [{"status": 500}])]) as server:
        judge, waits = make_judge(server, max_attempts=4)
        result = judge.judge(ask("down"), "k")
    assert result.rating is None and "HTTP 500" in result.error
    assert result.attempts == 4 and len(waits) == 3


def test_bad_request_is_not_retried():
    with FakeOpenAIServer([("big", [{"status": 400}])]) as server:
        judge, _ = make_judge(server)
        result = judge.judge(ask("big"), "k")
    assert result.rating is None and result.attempts == 1 and "not retryable" in result.error


def test_rejected_key_raises_clear_error():
    with FakeOpenAIServer([("x", [{"status": 401}])]) as server:
        judge, _ = make_judge(server)
        with pytest.raises(JudgeConfigError, match="API key"):
            judge.judge(ask("x"), "k")


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        Judge(model="gpt-4", base_url="http://127.0.0.1:9/v1")


def test_judge_many_concurrent():
    rules = [(f"q{i}", [{"status": 200, "content": f"[[{i}]]"}]) for i in range(1, 7)]
    with FakeOpenAIServer(rules) as server:
        judge, _ = make_judge(server)
        results = list(judge.judge_many([(f"k{i}", ask(f"q{i}")) for i in range(1, 7)], concurrency=3))
    assert sorted((r.key, r.rating) for r in results) == [(f"k{i}", i) for i in range(1, 7)]


def test_judgement_key_depends_on_every_part():
    base = judgement_key(1, "hash", "gpt-4", 0)
    assert base == judgement_key(1, "hash", "gpt-4", 0)
    assert len({base, judgement_key(2, "hash", "gpt-4", 0), judgement_key(1, "h2", "gpt-4", 0),
                judgement_key(1, "hash", "gpt-4o", 0), judgement_key(1, "hash", "gpt-4", 1)}) == 5
