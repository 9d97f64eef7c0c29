"""Needle answers scored 1-10: by an LLM judge against the needle, or offline by key facts.

The judge prompt follows the needle test's accuracy rubric (1 unrelated ... 10 fully accurate);
`match_score` maps the share of the needle's key facts found in the answer to 1 + 9 * share.
"""
from __future__ import annotations

import hashlib
import re

from longalign.judge import judgement_key, messages_hash

JUDGE_SYSTEM = "You are a helpful assistant."
RUBRIC = (
    "Score 1: The answer is completely unrelated to the reference.\n"
    "Score 3: The answer has minor relevance but does not align with the reference.\n"
    "Score 5: The answer has moderate relevance but contains inaccuracies.\n"
    "Score 7: The answer aligns with the reference but has minor omissions.\n"
    "Score 10: The answer is completely accurate and aligns perfectly with the reference."
)
JUDGE_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
    "by an AI assistant to the user question displayed below. For this evaluation, you should primarily "
    "consider accuracy:\n{rubric}\n[Ground truth]\n{reference}\n"
    "Begin your evaluation by providing a short explanation. Be as objective as possible. After providing "
    "your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
    "\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{prediction}\n[The End of Assistant's Answer]"
)
MIN_SCORE, MAX_SCORE = 1.0, 10.0
JUDGE_RUNS = 1  # one judgement per prediction, as the original
# identifies the judge prompt in summaries (the needle suite's counterpart of prompt_fs.txt's hash)
JUDGE_PROMPT_SHA256 = hashlib.sha256("\0".join((JUDGE_SYSTEM, JUDGE_TEMPLATE, RUBRIC)).encode("utf-8")).hexdigest()


def judge_messages(needle: str, question: str, prediction: str) -> list[dict]:
    user = JUDGE_TEMPLATE.format(rubric=RUBRIC, reference=needle.strip(), question=question, prediction=prediction)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_key(prediction_id: str, messages: list[dict], judge_model: str) -> str:
    """Cache key of one judgement: the prediction id, the exact messages and the judge model."""
    return judgement_key("needle", prediction_id, messages_hash(messages), judge_model)


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed (so 'Dolores  Park,' matches)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_score(prediction: str, key_facts: list[str]) -> tuple[float, list[str]]:
    """(1 + 9 * share of key facts contained, the facts found)."""
    if not key_facts:
        raise ValueError("the match scorer needs key_facts in config-eval.yaml")
    answer = f" {normalize(prediction)} "
    found = [fact for fact in key_facts if f" {normalize(fact)} " in answer]
    share = len(found) / len(key_facts)
    return round(MIN_SCORE + (MAX_SCORE - MIN_SCORE) * share, 2), found
