"""Requests to OpenAI-compatible servers, shared by the judge and served candidate models (DESIGN.md §6).

One request is one POST to `{base_url}/chat/completions` or `{base_url}/completions` through the
`openai` SDK with its own retries off. The body is parsed here, not by the SDK, so a 200 whose
body is not a completion (malformed JSON, an HTML page, a bare string, no choices) is a failed
attempt like any other instead of an exception deep inside the caller:

| outcome of one attempt                                          | what happens                       |
|-----------------------------------------------------------------|------------------------------------|
| connection error, timeout (`timeout_s`), 408/409/429, 5xx       | retried                            |
| 200 with a malformed body                                       | retried                            |
| 401 / 403                                                       | `AuthenticationFailed`, no retry;  |
|                                                                 | `run_pool` stops every worker      |
| any other 4xx (prompt too long, unknown model)                  | not retried: the request fails     |

Waits between attempts (`RetryPolicy.wait_s`): `backoff_s`, doubled after every failed attempt,
never above `max_backoff_s`; a server's Retry-After (seconds or an HTTP date) replaces the
backoff and is capped at `max_backoff_s` as well.
"""
from __future__ import annotations

import email.utils
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

RETRYABLE_STATUS = (408, 409, 429)
SERVER_ERROR_MIN = 500
BODY_EXCERPT_CHARS = 120  # how much of a malformed body an error message quotes
CHAT = "chat"
COMPLETIONS = "completions"
APIS = (CHAT, COMPLETIONS)


class AuthenticationFailed(RuntimeError):
    """The server refused the API key (401/403): no retry can help, so everything stops."""


class PoolStopped(RuntimeError):
    """A request was not sent because another worker of the pool hit an authentication error."""


class RequestFailed(Exception):
    """One attempt failed; `retryable` says whether another attempt may succeed."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None
    total_tokens: int
    finish_reason: str | None


@dataclass
class RetryPolicy:
    max_attempts: int = 6  # requests for one item, failed and unusable replies together
    max_unusable: int = 3  # replies the caller's check rejects (e.g. no rating) before giving up
    backoff_s: float = 1.0  # first wait; doubled after every failed attempt
    max_backoff_s: float = 60.0  # no wait is longer, Retry-After included

    def wait_s(self, backoff: float, retry_after: float | None) -> float:
        return min(retry_after if retry_after is not None else backoff, self.max_backoff_s)


@dataclass
class Outcome:
    """What `call_with_retries` got: the accepted value (None when it gave up) and the cost."""

    value: Any
    reply: Reply | None  # the last reply received (accepted or not)
    attempts: int
    tokens: int
    error: str | None


def parse_completion(raw: str, api: str) -> Reply:
    """A `Reply` from the raw body of a 200 answer; RequestFailed(retryable) if it is not one."""
    excerpt = raw[:BODY_EXCERPT_CHARS]
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        raise RequestFailed(f"malformed 200 body (not JSON: {err}); it starts {excerpt!r}", True) from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RequestFailed(f"malformed 200 body (no choices); it starts {excerpt!r}", True)
    choice = choices[0]
    if api == CHAT:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise RequestFailed(f"malformed 200 body (no text in the first choice); it starts {excerpt!r}", True)
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return Reply(text=text, prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                 total_tokens=_int_or_none(usage.get("total_tokens")) or 0,
                 finish_reason=choice.get("finish_reason"))


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class OpenAICompatibleClient:
    """POSTs to one server; `what` ("judge", "model") names it in error messages."""

    def __init__(self, base_url: str | None, api_key: str, timeout_s: float, what: str):
        import openai

        self.base_url, self.timeout_s, self.what = base_url, timeout_s, what
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)

    def chat(self, model: str, messages: list[dict], **params) -> Reply:
        return self._post(CHAT, model=model, messages=messages, **params)

    def complete(self, model: str, prompt: str, **params) -> Reply:
        return self._post(COMPLETIONS, model=model, prompt=prompt, **params)

    def _post(self, api: str, **kwargs) -> Reply:
        import openai

        resource = self._client.chat.completions if api == CHAT else self._client.completions
        try:
            raw = resource.with_raw_response.create(**kwargs)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise AuthenticationFailed(f"the {self.what} server {self.base_url or 'api.openai.com'} refused the "
                                       f"API key (HTTP {err.status_code}): {err}") from err
        except openai.APITimeoutError as err:
            raise RequestFailed(f"no answer within the {self.timeout_s:g} s request timeout", True) from err
        except openai.APIConnectionError as err:
            raise RequestFailed(f"{type(err).__name__}: {err}", True) from err
        except openai.APIStatusError as err:
            retryable = err.status_code in RETRYABLE_STATUS or err.status_code >= SERVER_ERROR_MIN
            note = "" if retryable else " (not retryable)"
            raise RequestFailed(f"HTTP {err.status_code}{note}: {err}", retryable, _retry_after(err)) from err
        return parse_completion(raw.text, api)


def _retry_after(err) -> float | None:
    """Retry-After of an error answer in seconds (a number or an HTTP date), or None."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def call_with_retries(send: Callable[[], Reply], policy: RetryPolicy,
                      accept: Callable[[Reply], tuple[Any, str | None]],
                      sleep: Callable[[float], None] = time.sleep, stop: threading.Event | None = None) -> Outcome:
    """Call `send` until `accept(reply)` gives `(value, None)` or the policy's attempts run out.

    `accept` returns `(None, reason)` for a reply that cannot be used (asked again at most
    `policy.max_unusable` times). Raises AuthenticationFailed at once, PoolStopped when `stop`
    is set before an attempt; every other failure ends as an Outcome with `value=None`.
    """
    outcome = Outcome(value=None, reply=None, attempts=0, tokens=0, error=None)
    unusable, backoff = 0, policy.backoff_s
    while outcome.attempts < policy.max_attempts:
        if stop is not None and stop.is_set():
            raise PoolStopped("not sent: another request hit an authentication error")
        outcome.attempts += 1
        retry_after = None
        try:
            reply = send()
        except RequestFailed as err:
            outcome.error, retry_after = str(err), err.retry_after
            if not err.retryable:
                break
        else:
            outcome.reply, outcome.tokens = reply, outcome.tokens + reply.total_tokens
            value, outcome.error = accept(reply)
            if outcome.error is None:
                outcome.value = value
                return outcome
            unusable += 1
            if unusable >= policy.max_unusable:
                break
        if outcome.attempts < policy.max_attempts:
            sleep(policy.wait_s(backoff, retry_after))
            backoff = min(backoff * 2, policy.max_backoff_s)
    return outcome


def run_pool(items: Iterable, work: Callable[[Any, threading.Event], Any], concurrency: int) -> Iterator:
    """`work(item, stop)` for every item on `concurrency` threads, yielding results as they finish.

    The first AuthenticationFailed (or any other exception) sets `stop`: requests already on the
    wire finish, nothing else is sent (`call_with_retries` checks `stop`), the queue is cancelled,
    and the first error is raised.
    """
    stop, first_error = threading.Event(), []

    def guarded(item):
        if stop.is_set():
            raise PoolStopped("not sent: another request hit an authentication error")
        try:
            return work(item, stop)
        except PoolStopped:
            raise
        except BaseException as err:
            first_error.append(err)
            stop.set()
            raise

    if concurrency <= 1:
        for item in items:
            yield guarded(item)
        return
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = [pool.submit(guarded, item) for item in items]
        for future in as_completed(futures):
            try:
                result = future.result()
            except BaseException:
                if first_error:  # the cause, not the PoolStopped of a worker that stopped after it
                    raise first_error[0] from None
                raise
            yield result
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
