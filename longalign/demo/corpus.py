"""Pretraining text for the demo's tiny base: generated documents rich in repetition.

Every token of this text is a training target (plain language-model loss), so the model meets
many spans it can only predict by finding an earlier copy in its context -- the signal from
which induction heads form (Olsson et al. 2022; "Birth of a Transformer", arXiv 2306.00802).
Document kinds, in `DOCUMENT_MIX` proportions:
  facts     filler with facts ("The locker number of Kalomir is 51234."), some restated at the
            end in another order (the value after "The locker number of Kalomir is" is a copy)
  lists     a list (filler words, made-up names, codes, nonsense words) quoted again
  nonsense  nonsense words (random letters) repeated: copying tokens the model cannot know
  dialogue  two speakers; one repeats what the other said earlier
  essay     plain filler, the language itself
  repeats   a short span of mixed items said 2-5 times in a row: most of its tokens are copies
No chat template and no instruction question form occurs here: the demo's fine-tuning teaches
those. Nothing in `longalign.demo.words.FORBIDDEN` occurs (tested).
"""
from __future__ import annotations

import math
import random

from longalign.demo.words import activity, code, filler, name, nonsense_word, place

DOCUMENT_MIX = {"facts": 0.35, "lists": 0.2, "nonsense": 0.2, "dialogue": 0.1, "essay": 0.15}
FACT_KEYS = ("access code", "locker number", "room number", "ticket number", "phone number",
             "house number", "bus number", "badge number")
_LIST_INTROS = ("Here is the list", "The items were", "Write down these", "Keep these in mind",
                "Notes", "The sequence is")
_AGAIN = ("Again", "Once more", "To repeat", "In other words", "That is", "Copy")
_RECALL_INTROS = ("In short", "To sum up", "Remember", "As noted above", "Recall")
_SPEAKERS = ("Ana", "Bo", "Cyd", "Dov", "Eli", "Fay")
_DIALOGUE_ASKS = ("Sorry, can you say that again?", "What did you say?", "Could you repeat that?",
                  "Pardon?", "Say it once more.")


def fact(rng: random.Random) -> tuple[str, str]:
    """(key, value) of a fact sentence "The {key} is {value}."."""
    kind = rng.random()
    if kind < 0.45:
        return f"{rng.choice(FACT_KEYS)} of {name(rng, rng.randint(2, 3))}", code(rng, rng.randint(3, 7))
    if kind < 0.7:
        return f"best thing to do in {place(rng)}", activity(rng)
    if kind < 0.85:
        return f"password of {name(rng)}", " ".join(nonsense_word(rng) for _ in range(rng.randint(1, 3)))
    return f"favourite word of {name(rng)}", nonsense_word(rng)


def _spread(rng: random.Random, sentences: list[str], inserts: list[str]) -> list[str]:
    sentences = list(sentences)
    for text in inserts:
        sentences.insert(rng.randint(0, len(sentences)), text)
    return sentences


def facts_document(rng: random.Random, words: int) -> str:
    facts = [fact(rng) for _ in range(rng.randint(1, 5))]
    body = _spread(rng, filler(rng, words), [f"The {k} is {v}." for k, v in facts])
    recalled = rng.sample(facts, rng.randint(1, len(facts)))
    recall = " ".join(f"The {k} is {v}." for k, v in recalled)
    return f"{' '.join(body)}\n{rng.choice(_RECALL_INTROS)}: {recall}"


def _list_item(rng: random.Random, kind: float) -> str:
    if kind < 0.3:
        return rng.choice(filler(rng, 10)).split()[rng.randint(0, 3)].strip(".,")
    if kind < 0.55:
        return name(rng, rng.randint(1, 3))
    if kind < 0.75:
        return code(rng, rng.randint(3, 7))
    return nonsense_word(rng)


def list_document(rng: random.Random, words: int) -> str:
    kind = rng.random()
    items = " ".join(_list_item(rng, kind if rng.random() < 0.7 else rng.random())
                     for _ in range(rng.randint(3, 40)))
    between = " ".join(filler(rng, rng.randint(0, words))) if rng.random() < 0.5 else ""
    return f"{rng.choice(_LIST_INTROS)}: {items}\n{between}\n{rng.choice(_AGAIN)}: {items}".replace("\n\n", "\n")


def nonsense_document(rng: random.Random, words: int) -> str:
    span = " ".join(nonsense_word(rng) for _ in range(rng.randint(4, 60)))
    copies = [span] * rng.randint(2, 3)
    if rng.random() < 0.5:  # the copies apart, filler between
        copies = [c + "\n" + " ".join(filler(rng, rng.randint(10, words))) for c in copies[:-1]] + copies[-1:]
    return "\n".join(copies)


def _said_again(rng: random.Random, span: str, times: int) -> str:
    """ "<intro>: span" then `times` lines "<again>: span" (the same draws as before this helper)."""
    copies = [f"{rng.choice(_AGAIN)}: {span}" for _ in range(times)]
    return "\n".join([f"{rng.choice(_LIST_INTROS)}: {span}", *copies])


def repeats_document(rng: random.Random, words: int) -> str:
    """The densest copy signal: a 3-20 item span (any list item kind), then 1-4 more copies, each
    after a short intro; `words` is unused (these documents stay short)."""
    kind = rng.random()
    span = " ".join(_list_item(rng, kind) for _ in range(rng.randint(3, 20)))
    return _said_again(rng, span, rng.randint(1, 4))


def dialogue_document(rng: random.Random, words: int) -> str:
    a, b = rng.sample(_SPEAKERS, 2)
    said = rng.choice((lambda: "The {} is {}.".format(*fact(rng)), lambda: " ".join(filler(rng, 20))))()
    chat = " ".join(filler(rng, rng.randint(10, max(10, words))))
    return f"{a}: {said}\n{b}: {chat}\n{a}: {chat.split('.')[0]}.\n{b}: {rng.choice(_DIALOGUE_ASKS)}\n{a}: {said}"


def essay_document(rng: random.Random, words: int) -> str:
    return " ".join(filler(rng, words))


DOCUMENTS = {"facts": facts_document, "lists": list_document, "nonsense": nonsense_document,
             "dialogue": dialogue_document, "essay": essay_document, "repeats": repeats_document}


def soup_documents(seed: int, count: int, pieces: list[str], smallest_alphabet: int = 0) -> list[str]:
    """`count` documents of "token soup": a span of 4-30 pieces (a tokenizer's vocabulary entries,
    see `vocabulary_pieces`) drawn uniformly, then 1-3 more copies. Copying forms far sooner when
    the copied tokens span the whole vocabulary than when they are the few dozen tokens that
    spell nonsense words (BENCHMARKS §12c).

    `smallest_alphabet` > 0: each document draws its span from its own alphabet of k pieces, k
    log-uniform in [smallest_alphabet, len(pieces)], so small alphabets repeat pieces inside a span
    and only a longer match than the previous token says what comes next:
        alphabet {ab, c, d}: span "ab c ab d ab ab c" -- after "ab", the next piece depends on more.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        alphabet = pieces
        if smallest_alphabet:
            size = round(math.exp(rng.uniform(math.log(smallest_alphabet), math.log(len(pieces)))))
            alphabet = rng.sample(pieces, min(size, len(pieces)))
        span = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 30))).strip()
        out.append(_said_again(rng, span, rng.randint(1, 3)))
    return out


def vocabulary_pieces(tokenizer) -> list[str]:
    """The text of each non-special vocabulary entry that decodes to whole characters on one line."""
    special = set(tokenizer.all_special_ids)
    pieces = (tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special)
    return [piece for piece in pieces if piece.strip() and "\ufffd" not in piece and "\n" not in piece]


def parse_mix(text: str) -> dict[str, float]:
    """"facts:0.3,lists:0.3,..." -> {kind: weight}; every kind known, weights >= 0 with a positive sum."""
    mix = {}
    for item in filter(None, text.split(",")):
        kind, _, weight = item.partition(":")
        if kind not in DOCUMENTS:
            raise ValueError(f"unknown document kind {kind!r} in {text!r}; known: {sorted(DOCUMENTS)}")
        mix[kind] = float(weight)
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"a mix needs kind:weight items with weights >= 0 and a positive sum, got {text!r}")
    total = sum(mix.values())
    return {kind: weight / total for kind, weight in mix.items()}  # shares


def documents(seed: int, count: int, max_words: int, mix: dict[str, float] | None = None) -> list[str]:
    """`count` documents of up to about `max_words` filler words each, kinds drawn by `mix`
    (default DOCUMENT_MIX)."""
    rng = random.Random(seed)
    mix = mix or DOCUMENT_MIX
    kinds, weights = list(mix), list(mix.values())
    return [DOCUMENTS[rng.choices(kinds, weights)[0]](rng, rng.randint(10, max_words)) for _ in range(count)]
