"""Needle answers scored 1-10: by an LLM judge against the needle, or offline by key facts.

Both score against the needle and question the predictions were made with (recorded by pred.py
from the prompt set), never a config's copy; key facts must occur in that needle (`check_key_facts`).

The judge prompt follows the needle test's accuracy rubric (1 unrelated ... 10 fully accurate);
`match_score` maps the share of the needle's key facts found in the answer to 1 + 9 * share.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from longalign.eval.judge import judgement_key, messages_hash
from longalign.eval.needle_test.prompt_set import needle_of, read_prompt_set

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


def check_key_facts(key_facts: list[str], needle: str, where: str) -> list[str]:
    """`key_facts` if every one occurs in `needle` (the needle the predictions were made with),
    else a ValueError naming `where`, the facts and the needle: facts of another needle score nothing."""
    if not key_facts:
        raise ValueError(f"{where}: the match scorer needs key facts (facts of the needle)")
    padded = f" {normalize(needle)} "
    foreign = [fact for fact in key_facts if f" {normalize(fact)} " not in padded]
    if foreign:
        raise ValueError(f"{where}: {foreign} do not occur in the needle the predictions were made with "
                         f"({needle.strip()!r}); give facts of that needle")
    return key_facts


def recorded_needle(settings: dict, pred_file: Path, prompt_dir: Path | None) -> dict:
    """The needle and question the predictions' prompt set was built with: from their settings
    (pred.py records them), else from the manifest of `prompt_dir` if it is their prompt set."""
    needle = settings.get("needle")
    if needle and needle.get("needle") and needle.get("retrieval_question"):
        return needle
    where = f"{pred_file} ({pred_file.name}.settings.json) does not record the needle its prompts were built with " \
            "(an older pred.py)"
    if prompt_dir is None:
        raise ValueError(f"{where}: pass --prompt_dir with the prompt set they were made from, or rerun "
                         "Needle_test/pred.py into a new save_file")
    manifest, _ = read_prompt_set(prompt_dir)
    if manifest["prompt_set_sha256"] != settings.get("prompt_set_sha256"):
        raise ValueError(f"{where}, and the prompt set in {prompt_dir} ({manifest['prompt_set_sha256'][:12]}) is "
                         f"not theirs ({str(settings.get('prompt_set_sha256'))[:12]}): pass the prompt folder they "
                         "were made from")
    return needle_of(manifest)


def check_config_needle(section: dict, config_path, needle: dict, pred_file: Path) -> None:
    """An eval config's `prompt` section must name the needle and question the predictions were made with."""
    for key, value in section.items():
        if value is not None and value != needle[key]:
            raise ValueError(f"{config_path}: prompt.{key} is {value!r}, but the predictions in {pred_file} were "
                             f"made with {needle[key]!r}: they are scored against their own needle and question; "
                             f"remove prompt.{key} from the config (or fix it)")
