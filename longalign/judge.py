"""An LLM judge over any OpenAI-compatible chat-completions server (DESIGN.md §6).

`Judge.judge(messages, key)` asks the judge at temperature 0 and returns a `Judgement`:
- the rating is the *last* `[[n]]` in the reply (judges often quote the format before rating);
- connection errors, timeouts, 408/409/429 and 5xx answers are retried with exponential backoff
  (a server's Retry-After is honoured); a reply without a rating in range is asked again;
- when the attempts are used up the judgement is returned with `rating=None` and the reason in
  `error` — the caller counts it as missing; nothing raises except a bad API key/permission,
  which no retry can fix;
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

from longalign.storage import append_jsonl, drop_torn_tail, read_jsonl

logger = logging.getLogger(__name__)

RATING_PATTERN = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RETRYABLE_STATUS = (408, 409, 429)
SERVER_ERROR_MIN = 500
DEFAULT_TIMEOUT_S = 120.0


class JudgeConfigError(RuntimeError):
    """The judge cannot work at all (missing key, rejected key): retrying would not help."""


def parse_rating(text: str | None, low: float = 1, high: float = 10) -> float | None:
    """The last `[[n]]` in `text` as a number if it lies in [low, high], else None."""
    if not text:
        return None
    matches = RATING_PATTERN.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if low <= value <= high else None


def judgement_key(*parts) -> str:
    """A stable cache key from JSON-serialisable parts (e.g. case id, prediction hash, model, run)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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
class RetryPolicy:
    max_attempts: int = 6  # requests for one judgement, errors and unrated replies together
    max_unrated: int = 3  # replies without a rating before giving up
    backoff_s: float = 1.0  # first wait; doubled after every failed request
    max_backoff_s: float = 60.0


@dataclass
class Judge:
    model: str
    base_url: str | None = None
    api_key: str | None = None
    cache_path: str | os.PathLike | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = DEFAULT_TIMEOUT_S
    rating_range: tuple[float, float] = (1, 10)
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        import openai

        api_key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeConfigError("no judge API key: set OPENAI_API_KEY (for a keyless local "
                                   "OpenAI-compatible server any value works, e.g. OPENAI_API_KEY=EMPTY)")
        base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0,
                                     timeout=self.timeout_s)
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

    def judge(self, messages: list[dict], key: str) -> Judgement:
        """Rate once (cached per key); see the module docstring for the retry rules."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        result = self._ask(messages, key)
        if result.rating is not None and self.cache_path is not None:
            with self._lock:
                append_jsonl(self.cache_path, result.to_record())
                self._cache[key] = result.to_record()
        return result

    def judge_many(self, jobs: Iterable[tuple[str, list[dict]]], concurrency: int = 1) -> Iterator[Judgement]:
        """Judge `(key, messages)` jobs with `concurrency` threads, yielding as they finish."""
        jobs = list(jobs)
        if concurrency <= 1:
            for key, messages in jobs:
                yield self.judge(messages, key)
            return
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(self.judge, messages, key) for key, messages in jobs]
            for future in as_completed(futures):
                yield future.result()

    def _ask(self, messages: list[dict], key: str) -> Judgement:
        result = Judgement(key=key, rating=None, text=None)
        unrated = 0
        wait = self.retry.backoff_s
        while result.attempts < self.retry.max_attempts:
            result.attempts += 1
            retry_after = None
            try:
                text, tokens = self._request(messages)
            except _Retryable as err:
                result.error, retry_after = str(err), err.retry_after
                if err.fatal:
                    break
            else:
                result.tokens += tokens
                result.text = text
                result.rating = parse_rating(text, *self.rating_range)
                if result.rating is not None:
                    result.error = None
                    return result
                unrated += 1
                result.error = f"no [[rating]] in {self.rating_range} in the reply"
                if unrated >= self.retry.max_unrated:
                    break
            if result.attempts < self.retry.max_attempts:
                self.sleep(retry_after if retry_after is not None else wait)
                wait = min(wait * 2, self.retry.max_backoff_s)
        logger.warning("judge gave no rating for %s after %d attempts: %s", key[:12], result.attempts, result.error)
        return result

    def _request(self, messages: list[dict]) -> tuple[str, int]:
        import openai

        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise JudgeConfigError(f"the judge server refused the API key: {err}") from err
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
        except openai.APIStatusError as err:
            if err.status_code in RETRYABLE_STATUS or err.status_code >= SERVER_ERROR_MIN:
                raise _Retryable(f"HTTP {err.status_code}: {err}", _retry_after(err)) from err
            raise _Retryable(f"HTTP {err.status_code} (not retryable): {err}", fatal=True) from err
        usage = getattr(response, "usage", None)
        tokens = int(getattr(usage, "total_tokens", 0) or 0)
        content = response.choices[0].message.content if response.choices else None
        return content or "", tokens


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, fatal: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.fatal = fatal


def _retry_after(err) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
