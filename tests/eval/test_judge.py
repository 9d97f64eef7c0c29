"""longalign.eval.judge against a real loopback chat-completions server (tests/helpers/fake_openai_server.py)."""
import time

import pytest

from helpers.fake_openai_server import COMPLETION_TOKENS, PROMPT_TOKENS, FakeOpenAIServer
from longalign.eval.judge import Judge, JudgeConfigError, judgement_key, parse_rating
from longalign.eval.openai_api import AuthenticationFailed, RetryPolicy
from longalign.storage import read_jsonl

TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS


def make_judge(server, tmp_path=None, timeout_s=5.0, **retry):
    waits = []
    judge = Judge(model="gpt-4", base_url=server.base_url, api_key="test-key",
                  cache_path=None if tmp_path is None else tmp_path / "cache.jsonl",
                  retry=RetryPolicy(**{"backoff_s": 0.01, **retry}), sleep=waits.append, timeout_s=timeout_s)
    return judge, waits


def ask(text):
    return [{"role": "user", "content": text}]


def test_parse_rating_takes_the_last_brackets_signed():
    assert parse_rating('format "[[rating]]", e.g. [[5]]. My verdict: [[8]]') == 8
    assert parse_rating('For example "Rating: [[5]]". My rating: [[-1]]') is None  # the audit's reply
    assert parse_rating("Rating: [[ 7 ]]") == 7
    assert parse_rating("[[2.5]]") == 2.5
    assert parse_rating("[[+3]]") == 3
    assert parse_rating("[[7/10]]") == 7  # first number inside the last brackets, as the original
    assert parse_rating("no rating here") is None
    assert parse_rating("[[11]]") is None and parse_rating("[[0]]") is None  # out of range: missing
    assert parse_rating("[[9]] but the format is [[rating]]") is None  # last brackets hold no number


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


@pytest.mark.parametrize("reply, reason", [
    ({"body": "{not json", "content_type": "application/json"}, "not JSON"),
    ({"body": "<html><body>Bad gateway</body></html>", "content_type": "text/html"}, "not JSON"),
    ({"body": '"just a string"'}, "no choices"),
    ({"body": '{"choices": [{"message": {"role": "assistant"}}]}'}, "no text"),
])
def test_malformed_200_bodies_are_retried_then_missing(reply, reason):
    with FakeOpenAIServer([("bad", [reply])]) as server:
        judge, waits = make_judge(server, max_attempts=3)
        result = judge.judge(ask("bad"), "k")
    assert result.rating is None and "malformed 200 body" in result.error and reason in result.error
    assert result.attempts == 3 and len(server.requests) == 3 and len(waits) == 2


def test_malformed_body_then_a_good_one():
    with FakeOpenAIServer([("bad", [{"body": "<html>oops</html>", "content_type": "text/html"},
                                    {"status": 200, "content": "[[4]]"}])]) as server:
        judge, _ = make_judge(server)
        result = judge.judge(ask("bad"), "k")
    assert (result.rating, result.attempts, result.error) == (4, 2, None)


def test_no_rating_retried_then_missing_not_zero(tmp_path):
    with FakeOpenAIServer([("mute", [{"status": 200, "content": "I cannot rate this."}])]) as server:
        judge, _ = make_judge(server, tmp_path, max_unusable=3)
        result = judge.judge(ask("mute"), "k")
    assert result.rating is None and "no [[rating]]" in result.error
    assert result.attempts == 3 and result.tokens == 3 * TOKENS
    assert result.text == "I cannot rate this."
    assert read_jsonl(tmp_path / "cache.jsonl") == []  # a missing rating is asked again next run


def test_out_of_range_rating_is_missing():
    with FakeOpenAIServer([("neg", [{"status": 200, "content": 'e.g. "Rating: [[5]]". My rating: [[-1]]'}])]) as server:
        judge, _ = make_judge(server, max_unusable=2)
        result = judge.judge(ask("neg"), "k")
    assert result.rating is None and result.attempts == 2


def test_persistent_errors_give_missing_after_max_attempts():
    with FakeOpenAIServer([("down", [{"status": 500}])]) as server:
        judge, waits = make_judge(server, max_attempts=4)
        result = judge.judge(ask("down"), "k")
    assert result.rating is None and "HTTP 500" in result.error
    assert result.attempts == 4 and len(waits) == 3


def test_retry_after_is_capped_by_max_backoff():
    script = [{"status": 429, "retry_after": "90"}, {"status": 503, "retry_after": "3600"},
              {"status": 200, "content": "[[7]]"}]
    with FakeOpenAIServer([("slow", script)]) as server:
        judge, waits = make_judge(server, backoff_s=0.5, max_backoff_s=2.0)
        result = judge.judge(ask("slow"), "k")
    assert result.rating == 7 and waits == [2.0, 2.0]  # never the 90 s / 1 h the server asked for


def test_request_timeout_is_honoured():
    with FakeOpenAIServer([("hang", [{"status": 200, "content": "[[5]]", "delay_s": 5}])]) as server:
        judge, waits = make_judge(server, timeout_s=0.3, max_attempts=2)
        started = time.monotonic()
        result = judge.judge(ask("hang"), "k")
        elapsed = time.monotonic() - started
    assert result.rating is None and "0.3 s request timeout" in result.error
    assert result.attempts == 2 and elapsed < 3  # two 0.3 s attempts, not two hung requests


def test_bad_request_is_not_retried():
    with FakeOpenAIServer([("big", [{"status": 400}])]) as server:
        judge, _ = make_judge(server)
        result = judge.judge(ask("big"), "k")
    assert result.rating is None and result.attempts == 1 and "not retryable" in result.error


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_raises_clear_error(status):
    with FakeOpenAIServer([("x", [{"status": status}])]) as server:
        judge, _ = make_judge(server)
        with pytest.raises(AuthenticationFailed, match=f"refused the API key \\(HTTP {status}\\)"):
            judge.judge(ask("x"), "k")
        assert len(server.requests) == 1


def test_authentication_error_stops_the_whole_pool():
    """The audit: a 401 at concurrency 4 still sent all 24 queued requests."""
    with FakeOpenAIServer([], default={"status": 401, "delay_s": 0.2}) as server:
        judge, _ = make_judge(server)
        jobs = [(f"k{i}", ask(f"q{i}")) for i in range(24)]
        with pytest.raises(AuthenticationFailed):
            list(judge.judge_many(jobs, concurrency=4))
        sent = len(server.requests)
    assert 1 <= sent <= 4  # only the requests already in flight when the first 401 came back


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
