"""An LLM judge over any OpenAI-compatible chat-completions server (DESIGN.md §6).

`Judge.judge(messages, key)` asks the judge at temperature 0 and returns a `Judgement`:
- the rating is the number in the *last* `[[...]]` of the reply, signed (`parse_rating`), as the
  original LongBench-Chat script reads it; a last `[[...]]` without a number, or a number
  outside the rating range (e.g. `[[-1]]`, `[[11]]`), is no rating;
- a reply without a rating is asked again (at most `RetryPolicy.max_unusable` times); failed
  requests — connection errors, timeouts (`timeout_s`), 408/409/429, 5xx and 200 answers whose
  body is not a completion — are retried with capped backoff (`longalign.eval.openai_api`);
- when the attempts are used up the judgement comes back with `rating=None` and the reason in
  `error`: the caller counts it as missing, never as a score. A refused API key (401/403)
  raises `longalign.eval.openai_api.AuthenticationFailed`, and `judge_many` then stops sending at once;
- a rated judgement is cached in a JSONL file under its key, so a rerun asks only what is left.
Tokens of every attempt (failed ones included) are summed in `tokens`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

from longalign.eval.openai_api import OpenAICompatibleClient, RetryPolicy, call_with_retries, run_pool
from longalign.storage import append_jsonl, drop_torn_tail, read_jsonl

logger = logging.getLogger(__name__)

BRACKETS_PATTERN = re.compile(r"\[\[([^\[\]]*)\]\]")
SIGNED_NUMBER_PATTERN = re.compile(r"[-+]?\d+(?:\.\d+)?")
DEFAULT_TIMEOUT_S = 120.0  # the original scripts' request timeout
DEFAULT_RATING_RANGE = (1.0, 10.0)
OPENAI_DEFAULT_ENDPOINT = "https://api.openai.com/v1"  # the SDK's default base URL


class JudgeConfigError(RuntimeError):
    """The judge cannot work at all (no API key): retrying would not help."""


def parse_rating(text: str | None, low: float = 1, high: float = 10) -> float | None:
    """The first signed number inside the last `[[...]]` of `text` if it lies in [low, high], else None.

    >>> parse_rating('For example "Rating: [[5]]". My rating: [[-1]]') is None
    True
    >>> parse_rating('e.g. [[5]]. Verdict: [[ 8 ]]')
    8.0
    """
    brackets = BRACKETS_PATTERN.findall(text or "")
    if not brackets:
        return None
    number = SIGNED_NUMBER_PATTERN.search(brackets[-1])
    if number is None:
        return None
    value = float(number.group())
    return value if low <= value <= high else None


def judgement_key(*parts) -> str:
    """A stable cache key from JSON-serialisable parts (e.g. case id, messages hash, model, run)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def messages_hash(messages: list[dict]) -> str:
    """sha256 of the exact messages sent: any change to prompt, examples or prediction changes it."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class Judgement:
    key: str
    rating: float | None
    text: str | None
    tokens: int = 0
    attempts: int = 0
    error: str | None = None
    cached: bool = False

    def to_record(self) -> dict:
        record = asdict(self)
        record.pop("cached")
        return record


@dataclass
class Judge:
    model: str
    base_url: str | None = None
    api_key: str | None = None
    cache_path: str | os.PathLike | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = DEFAULT_TIMEOUT_S
    rating_range: tuple[float, float] = DEFAULT_RATING_RANGE
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeConfigError("no judge API key: set OPENAI_API_KEY (for a keyless local "
                                   "OpenAI-compatible server any value works, e.g. OPENAI_API_KEY=EMPTY)")
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.endpoint = base_url or OPENAI_DEFAULT_ENDPOINT  # recorded in summaries
        self._client = OpenAICompatibleClient(base_url, api_key, self.timeout_s, what="judge")
        self._lock = threading.Lock()
        self._cache = {}
        if self.cache_path is not None:
            drop_torn_tail(self.cache_path)
            for record in read_jsonl(self.cache_path):
                if record.get("rating") is not None:
                    self._cache[record["key"]] = record

    def cached(self, key: str) -> Judgement | None:
        record = self._cache.get(key)
        if record is None:
            return None
        return Judgement(**{**record, "cached": True})

    def judge(self, messages: list[dict], key: str, stop: threading.Event | None = None) -> Judgement:
        """Rate once (cached per key); see the module docstring for the retry rules."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        result = self._ask(messages, key, stop)
        if result.rating is not None and self.cache_path is not None:
            with self._lock:
                append_jsonl(self.cache_path, result.to_record())
                self._cache[key] = result.to_record()
        return result

    def judge_many(self, jobs: Iterable[tuple[str, list[dict]]], concurrency: int = 1) -> Iterator[Judgement]:
        """Judge `(key, messages)` jobs on `concurrency` threads, yielding as they finish.

        An AuthenticationFailed stops the whole pool: no further request is sent.
        """
        return run_pool(list(jobs), lambda job, stop: self.judge(job[1], job[0], stop), concurrency)

    def _ask(self, messages: list[dict], key: str, stop: threading.Event | None) -> Judgement:
        low, high = self.rating_range

        def accept(reply):
            rating = parse_rating(reply.text, low, high)
            if rating is None:
                return None, f"no [[rating]] in [{low:g}, {high:g}] in the reply"
            return rating, None

        outcome = call_with_retries(lambda: self._client.chat(self.model, messages, temperature=0),
                                    self.retry, accept, self.sleep, stop)
        result = Judgement(key=key, rating=outcome.value, text=outcome.reply.text if outcome.reply else None,
                           tokens=outcome.tokens, attempts=outcome.attempts, error=outcome.error)
        if result.rating is None:
            logger.warning("judge gave no rating for %s after %d attempts: %s", key[:12], result.attempts, result.error)
        return result
