"""A candidate model behind an OpenAI-compatible server (vLLM, SGLang, TGI, a hosted API).

`--model_base_url URL --model_name NAME` sends the candidate's prompts to that server instead of
loading the model here. Two APIs (`--model_api`):
- `chat` (default; every server and hosted API has it): one user message holding the
  middle-truncated query; the server applies the model's chat template (chat format `server`);
- `completions`: the prompt is rendered here exactly as for a local model (LongAlign's training
  format or the tokenizer's chat template, `longalign.eval.prompt_formats`) and sent as text; the
  server's tokenizer adds the special tokens (BOS, `[gMASK]sop`). Use it to give a served model
  the very prompt text of a local run.

Truncation is `longalign.eval.generation.prepare_prompt`'s: by the tokens of `--tokenizer` (give the
model's own tokenizer for figures comparable to a local run), else by characters. A request
carries max_tokens = max_new_tokens, temperature, seed and top_p (when set). Failed requests are
retried (`longalign.eval.openai_api`); a case that still fails raises GenerationFailed (the suites
count it, go on, and a rerun retries it); a refused API key raises AuthenticationFailed. The key
comes from $MODEL_API_KEY (a keyless local server accepts the placeholder used otherwise).
The weights behind a server cannot be fingerprinted: its URL, model name and API identify it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from longalign.eval.prompt_formats import AUTO, resolve_chat_format
from longalign.eval.generation import Candidate, GenerationSettings, prepare_prompt
from longalign.remote_code import load_tokenizer
from longalign.eval.openai_api import APIS, CHAT, OpenAICompatibleClient, RetryPolicy, call_with_retries
from longalign.eval.prediction_keys import TOKENIZER_FILE_SUFFIXES, directory_fingerprint, resolve_model_dir

MODEL_API_KEY_ENV = "MODEL_API_KEY"
KEYLESS_PLACEHOLDER = "EMPTY"  # what vLLM / SGLang accept when started without --api-key
DEFAULT_MODEL_TIMEOUT_S = 600.0  # a 100k-token prompt and 1024 new tokens can take minutes on a busy server


class GenerationFailed(RuntimeError):
    """The server gave no usable answer for one case within the retry policy."""


def _model_type(directory: Path) -> str | None:
    """config.json's model_type when the tokenizer folder is a model folder (read, no code run)."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("model_type")


class ServedModel(Candidate):
    def __init__(self, base_url: str, model_name: str, api: str = CHAT, tokenizer: str | None = None,
                 chat_format: str = AUTO, trust_remote_code: bool = False,
                 timeout_s: float = DEFAULT_MODEL_TIMEOUT_S, api_key: str | None = None,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep):
        if api not in APIS:
            raise ValueError(f"--model_api must be one of {APIS}, got {api!r}")
        if not model_name:
            raise ValueError("--model_base_url needs --model_name (the name the server serves the model under)")
        self.base_url, self.model_name, self.api = base_url, model_name, api
        self.retry, self.sleep = retry or RetryPolicy(), sleep
        model_type = None
        if tokenizer:
            local = resolve_model_dir(tokenizer, TOKENIZER_FILE_SUFFIXES)
            self.tokenizer, self.tokenizer_path = load_tokenizer(str(local), trust_remote_code), str(tokenizer)
            self.tokenizer_fingerprint = directory_fingerprint(local, TOKENIZER_FILE_SUFFIXES)
            model_type = _model_type(local)
        self.chat_format = resolve_chat_format(chat_format, model_name, self.tokenizer, model_type,
                                               served_chat_api=api == CHAT)
        key = api_key or os.environ.get(MODEL_API_KEY_ENV) or KEYLESS_PLACEHOLDER
        self.client = OpenAICompatibleClient(base_url, key, timeout_s, what="model")

    def identity(self) -> dict:
        return {"kind": "served", "base_url": self.base_url, "model_name": self.model_name, "api": self.api}

    def respond(self, query: str, settings: GenerationSettings, stop=None) -> dict:
        """Truncate, render (completions) and ask the server; the reply with its truncation record."""
        prompt = prepare_prompt(query, self.chat_format, self.tokenizer, settings.max_length)
        params = {"max_tokens": settings.max_new_tokens, "temperature": settings.temperature, "seed": settings.seed}
        if settings.top_p is not None:
            params["top_p"] = settings.top_p
        if self.api == CHAT:
            def send():
                return self.client.chat(self.model_name, [{"role": "user", "content": prompt.text}], **params)
        else:
            def send():
                return self.client.complete(self.model_name, prompt.text, **params)
        outcome = call_with_retries(send, self.retry, lambda reply: (reply, None), self.sleep, stop)
        if outcome.value is None:
            raise GenerationFailed(f"{self.base_url} gave no answer after {outcome.attempts} attempts: {outcome.error}")
        reply = outcome.value
        return {"response": reply.text.strip(), **prompt.record(), "prompt_tokens": reply.prompt_tokens,
                "finish_reason": reply.finish_reason}
