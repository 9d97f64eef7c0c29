"""The demo's long tasks: a long document, a question, a one-sentence answer copied from it.

Each task is `make(rng, words) -> (query, answer)` over about `words` filler words:
  needle  one sentence "The best thing to do in <place> is <activity>." at a random depth, asked
          with the needle test's own question (NEEDLE_QUESTION): Needle_test/ asks it so
  kv      2-6 facts "The access code of <name> is <digits>." of one kind; one is asked by name
  fact    one fact of another wording (a password, a favourite word, a meeting place ...) asked
          in the needle test's form "What is the <key>? Here is the most relevant sentence ..."
HELD_OUT_TASKS are never trained on, only evaluated (a wording and a kind of value no training
text has): `magic` is "The special magic number for <place> is <7 digits>.".
The answer is always the sentence itself, so a model that finds the sentence the question's key
points at and copies it answers every task, the held-out one included.
"""
from __future__ import annotations

import math
import random

from longalign.demo.words import activity, code, filler, name, nonsense_word, place

FACT_QUESTION = "What is the {key}? Here is the most relevant sentence in the context:"
NEEDLE_QUESTION = FACT_QUESTION.replace("{key}", "best thing to do in {place}")  # the needle test's
KV_QUESTION = "What is the {kind} of {key}?"
KV_KINDS = ("access code", "locker number", "room number", "ticket number")
KV_MIN_FACTS, KV_MAX_FACTS = 2, 6  # key-value facts per document (one is asked)
DEFAULT_LONG_WORDS = (150, 1600)  # filler words per long example (log-uniform): ~200 to ~2000 tokens
MAGIC_DIGITS = 7


def insert_lines(rng: random.Random, sentences: list[str], facts: list[str]) -> str:
    """Put each fact at a random position of the filler (each on its own line) and join."""
    sentences = list(sentences)
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), f"\n{fact}\n")
    return " ".join(sentences).replace(" \n", "\n").replace("\n ", "\n")


def long_words(rng: random.Random, words_range: tuple[int, int]) -> int:
    low, high = words_range  # log-uniform: as many short as long documents per octave
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def one_fact(rng: random.Random, words: int, key: str, value: str) -> tuple[str, str]:
    """"The {key} is {value}." at a random depth of the filler, asked in the needle test's form
    (FACT_QUESTION); the answer is that sentence."""
    sentence = f"The {key} is {value}."
    document = insert_lines(rng, filler(rng, words), [sentence])
    return f"{document}\n{FACT_QUESTION.format(key=key)}", sentence


SCRAMBLED_NEEDLES = 0.8  # share of needles whose activity has words swapped for nonsense words
SCRAMBLE_WORD = 0.5  # chance that a word of such an activity is swapped


def scrambled(rng: random.Random, text: str) -> str:
    """`text` with some words swapped for nonsense words: a value no template can complete, only
    copying from the document gets it right."""
    return " ".join(nonsense_word(rng) if rng.random() < SCRAMBLE_WORD else word for word in text.split())


def needle_retrieval(rng: random.Random, words: int) -> tuple[str, str]:
    """The needle test's needle ("The best thing to do in <place> is <activity>.") and question
    (NEEDLE_QUESTION is FACT_QUESTION of that key); SCRAMBLED_NEEDLES of them with `scrambled` activities."""
    where, what = place(rng), activity(rng)
    if rng.random() < SCRAMBLED_NEEDLES:
        what = scrambled(rng, what)
    return one_fact(rng, words, f"best thing to do in {where}", what)


def kv_retrieval(rng: random.Random, words: int) -> tuple[str, str]:
    """Facts "The access code of Kalomir is 51234." for a few names, scattered in the filler; the
    question asks for one of them and the answer is that fact (the name must be matched)."""
    kind = rng.choice(KV_KINDS)
    names = list(dict.fromkeys(name(rng, rng.randint(2, 3)) for _ in range(rng.randint(KV_MIN_FACTS, KV_MAX_FACTS))))
    facts = [f"The {kind} of {who} is {code(rng, 5)}." for who in names]
    asked = rng.randrange(len(names))
    document = insert_lines(rng, filler(rng, words), facts)
    return f"{document}\n{KV_QUESTION.format(kind=kind, key=names[asked])}", facts[asked]


def _fact_key_value(rng: random.Random) -> tuple[str, str]:
    kind, who = rng.random(), name(rng, rng.randint(2, 3))
    if kind < 0.3:
        return f"password of {who}", " ".join(nonsense_word(rng) for _ in range(rng.randint(1, 3)))
    if kind < 0.5:
        return f"favourite word of {who}", nonsense_word(rng)
    if kind < 0.7:
        return f"meeting point of {who}", f"the {activity(rng).split(' the ')[-1]}"
    if kind < 0.85:
        return f"phone number of {who}", code(rng, rng.randint(6, 9))
    return f"home town of {who}", place(rng)


def fact_retrieval(rng: random.Random, words: int) -> tuple[str, str]:
    """One fact of a varied wording at a random depth, asked in the needle test's form."""
    return one_fact(rng, words, *_fact_key_value(rng))


def magic_retrieval(rng: random.Random, words: int) -> tuple[str, str]:
    """Held out: "The special magic number for <place> is <7 digits>." (no training text has it)."""
    key = f"special magic number for {place(rng)}"
    return one_fact(rng, words, key, code(rng, MAGIC_DIGITS))


LONG_TASKS = {"needle": needle_retrieval, "kv": kv_retrieval, "fact": fact_retrieval}
HELD_OUT_TASKS = {"magic": magic_retrieval}
ALL_TASKS = {**LONG_TASKS, **HELD_OUT_TASKS}


def messages_row(rounds: list[tuple[str, str]]) -> dict:
    """A `messages` row of user/assistant rounds."""
    messages = []
    for user, assistant in rounds:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def generate_long(rng: random.Random, count: int, words_range: tuple[int, int] = DEFAULT_LONG_WORDS,
                  tasks: tuple[str, ...] = tuple(LONG_TASKS)) -> list[dict]:
    """`count` long examples, the tasks in turn, each over a log-uniform number of filler words."""
    return [messages_row([LONG_TASKS[tasks[i % len(tasks)]](rng, long_words(rng, words_range))])
            for i in range(count)]
