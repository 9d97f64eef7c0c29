"""What the tiny base can do at its own context, in plain text (no chat format, no question form).

Two held-out measures, each the share of examples whose target span the model predicts exactly
(every target token the argmax given the true prefix: what greedy decoding would write):
  copy    nonsense words (random letters), filler, then "Again:" and the same words: the target
          is the second copy (tokens the model can only get from its context)
  recall  filler with 2-5 facts ("The locker number of Kalomir is 51234."), then a recall line
          "Remember: The <key of one fact> is" -- the target is that fact's value and its period
Examples come from their own seed and fill about `context` tokens (`fit_words`).
"""
from __future__ import annotations

import random

from longalign.demo.corpus import fact
from longalign.demo.words import filler, nonsense_word

MEASURES = ("copy", "recall")


def copy_example(rng: random.Random, words: int) -> tuple[str, str]:
    span = " ".join(nonsense_word(rng) for _ in range(rng.randint(8, 24)))
    return f"Notes: {span}\n{' '.join(filler(rng, words))}\nAgain:", f" {span}"


def recall_example(rng: random.Random, words: int) -> tuple[str, str]:
    facts = [fact(rng) for _ in range(rng.randint(2, 5))]
    sentences = filler(rng, words)
    for key, value in facts:
        sentences.insert(rng.randint(0, len(sentences)), f"The {key} is {value}.")
    key, value = rng.choice(facts)
    return f"{' '.join(sentences)}\nRemember: The {key} is", f" {value}."


EXAMPLES = {"copy": copy_example, "recall": recall_example}


def fit_words(make, seed: str, tokenizer, context: int) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, target ids) of the largest example (filler words) within `context`."""
    words = context
    while True:
        prompt, target = make(random.Random(seed), words)
        ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(prompt + target)["input_ids"][len(ids):]
        if len(ids) + len(target_ids) <= context or words <= 10:
            return ids, target_ids
        words = int(words * 0.9)


def target_hits(model, prompt_ids: list[int], target_ids: list[int]):
    """Per target token, whether the model's argmax given the true prefix is that token (a CPU bool tensor)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1]
    return logits.argmax(-1).cpu() == torch.tensor(target_ids)


def exact_span(model, prompt_ids: list[int], target_ids: list[int]) -> bool:
    return bool(target_hits(model, prompt_ids, target_ids).all())


def copy_probes(tokenizer, seed: int, context: int, examples: int) -> list[tuple[list[int], list[int]]]:
    """Held-out copy examples, tokenized once, for `copy_token_accuracy` during training."""
    return [fit_words(copy_example, f"{seed}-probe-{i}", tokenizer, context) for i in range(examples)]


def copy_token_accuracy(model, probes: list[tuple[list[int], list[int]]]) -> float:
    """Share of second-copy tokens predicted right (argmax, true prefix) over `probes`: the
    gradual trace of copying forming, where the exact-span measure is all or nothing."""
    right = sum(int(target_hits(model, prompt_ids, target_ids).sum()) for prompt_ids, target_ids in probes)
    total = sum(len(target_ids) for _, target_ids in probes)
    return right / total


def evaluate_base(model, tokenizer, seed: int, context: int, examples: int) -> dict:
    """{measure: {"exact": share, "examples": n, "context": tokens}} over held-out examples."""
    results = {}
    for measure in MEASURES:
        correct = sum(exact_span(model, *fit_words(EXAMPLES[measure], f"{seed}-{measure}-{i}", tokenizer, context))
                      for i in range(examples))
        results[measure] = {"exact": correct / examples, "examples": examples, "context": context}
    return results
