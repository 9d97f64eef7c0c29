"""The candidate model of an evaluation run: its command-line flags, how it is opened, the predict loop.

Both suites (LongBench_Chat/eval.py, Needle_test/pred.py) take the same candidate flags
(`add_candidate_arguments`): a local model (`--model PATH_OR_HUB_ID`) or a served one
(`--model_base_url URL --model_name NAME [--model_api chat|completions] [--tokenizer PATH]`),
`--chat_format`, `--trust_remote_code`. `predict_all` runs the cases not yet predicted and
appends each answer to a `longalign.eval.prediction_keys.PredictionLog` as it arrives.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields

from longalign.eval.prompt_formats import AUTO, REQUESTABLE
from longalign.eval.generation import Candidate, GenerationSettings, LocalModel
from longalign.eval.openai_api import APIS, CHAT, RetryPolicy, run_pool
from longalign.eval.prediction_keys import PredictionLog
from longalign.eval.served_model import DEFAULT_MODEL_TIMEOUT_S, GenerationFailed, ServedModel

logger = logging.getLogger(__name__)


@dataclass
class CandidateOptions:
    model: str | None = None  # local path or hub id
    model_base_url: str | None = None  # served: the server's /v1 URL
    model_name: str | None = None  # served: the name the server knows the model by
    model_api: str = CHAT
    tokenizer: str | None = None  # served: truncation by its tokens, its chat template
    chat_format: str = AUTO
    trust_remote_code: bool = False
    dtype: str = "auto"
    model_timeout_s: float = DEFAULT_MODEL_TIMEOUT_S
    model_concurrency: int = 1  # parallel requests to a served model
    model_max_attempts: int = RetryPolicy.max_attempts
    model_backoff_s: float = RetryPolicy.backoff_s
    model_max_backoff_s: float = RetryPolicy.max_backoff_s

    @property
    def label(self) -> str:
        """The model's name in outputs: the server's model name, else the local path or hub id."""
        return self.model_name if self.model_base_url else self.model


def add_candidate_arguments(parser: argparse.ArgumentParser) -> None:
    """The candidate flags; every default is None so a config file can fill what is not given."""
    group = parser.add_argument_group("candidate model (loaded here, or served with --model_base_url)")
    group.add_argument("--model", default=None, help="local path or Hugging Face id of the model")
    group.add_argument("--model_base_url", default=None,
                       help="send the prompts to this OpenAI-compatible server (e.g. http://localhost:8000/v1)")
    group.add_argument("--model_name", default=None, help="the served model's name (with --model_base_url)")
    group.add_argument("--model_api", choices=APIS, default=None,
                       help="chat: /chat/completions, the server's chat template (default); completions: "
                            "/completions with the prompt rendered here")
    group.add_argument("--tokenizer", default=None,
                       help="served model: the tokenizer that truncation counts in (else characters)")
    group.add_argument("--chat_format", "--family", dest="chat_format", choices=REQUESTABLE, default=None,
                       help="prompt format (default auto: see longalign/eval/prompt_formats.py)")
    group.add_argument("--trust_remote_code", action="store_true", default=None,
                       help="allow a model/tokenizer folder's own Python code to run (ChatGLM needs it)")
    group.add_argument("--dtype", default=None, help="auto = bfloat16 on GPU, float32 on CPU")
    group.add_argument("--model_timeout_s", type=float, default=None, help="served model: request timeout")
    group.add_argument("--model_concurrency", type=int, default=None, help="served model: parallel requests")
    group.add_argument("--model_max_attempts", type=int, default=None, help="served model: requests per case")
    group.add_argument("--model_backoff_s", type=float, default=None, help="served model: first wait, doubled")
    group.add_argument("--model_max_backoff_s", type=float, default=None,
                       help="served model: no wait is longer (Retry-After included)")


def candidate_options(args: argparse.Namespace, defaults: dict | None = None) -> CandidateOptions:
    """Flags given on the command line win over `defaults` (a config's model section), then the
    dataclass defaults."""
    defaults = defaults or {}
    values = {}
    for spec in fields(CandidateOptions):
        value = getattr(args, spec.name, None)
        if value is None:
            value = defaults.get(spec.name)
        if value is not None:
            values[spec.name] = value
    options = CandidateOptions(**values)
    if not options.model_base_url and not options.model:
        raise ValueError("no model: pass --model PATH (or --model_base_url URL --model_name NAME)")
    if options.model_concurrency < 1:
        raise ValueError(f"--model_concurrency must be >= 1, got {options.model_concurrency}")
    return options


def open_candidate(options: CandidateOptions) -> Candidate:
    """A LocalModel (tokenizer and config loaded, weights on first use) or a ServedModel."""
    if options.model_base_url:
        retry = RetryPolicy(max_attempts=options.model_max_attempts, backoff_s=options.model_backoff_s,
                            max_backoff_s=options.model_max_backoff_s)
        return ServedModel(options.model_base_url, options.model_name, options.model_api, options.tokenizer,
                           options.chat_format, options.trust_remote_code, options.model_timeout_s, retry=retry)
    if options.tokenizer and options.tokenizer != options.model:
        raise ValueError("--tokenizer is for served models; a local model uses the tokenizer in its folder")
    return LocalModel(options.model, options.chat_format, options.dtype,
                      trust_remote_code=options.trust_remote_code)


def predict_all(candidate: Candidate, log: PredictionLog, todo: list[tuple], settings: GenerationSettings,
                concurrency: int = 1, extra=None, tag: str = "predict") -> dict:
    """Answer every `(id, prompt, prompt_sha256)` of `todo`, appending each record to `log` as it arrives.

    A case the server cannot answer is counted in `failed` (id -> error) and left for a rerun;
    `extra(id)` adds suite fields to a record. Returns counts of what was done.
    """
    stats = {"predicted_now": 0, "truncated_now": 0, "failed": {}}
    workers = concurrency if isinstance(candidate, ServedModel) else 1

    def work(item, stop):
        record_id, prompt, _ = item
        try:
            return item, candidate.respond(prompt, settings, stop), None
        except GenerationFailed as err:
            return item, None, str(err)

    for (record_id, _, prompt_hash), result, error in run_pool(todo, work, workers):
        if error is not None:
            stats["failed"][str(record_id)] = error
            print(f"[{tag}] {record_id}: FAILED ({error}); a rerun retries it", flush=True)
            continue
        log.append(record_id, prompt_hash, {**(extra(record_id) if extra else {}), **result})
        stats["predicted_now"] += 1
        stats["truncated_now"] += int(result["truncated"])
        print(f"[{tag}] {record_id}: {result['query_length']} query {result['truncation_unit']}"
              f"{' (middle-truncated)' if result['truncated'] else ''}: {result['response'][:60]!r}", flush=True)
    return stats
