"""The embedded default: seeded synthetic long-context + short chat data, and a tokenizer for it.

    python -m longalign.demo_data --out data/demo/raw

writes, in the `messages` format of LongAlign-10k / ShareGPT,
- long.jsonl: long-context instructions over generated filler text whose answer is copied from
  the context, so a tiny model can learn them: key-value retrieval, a needle fact lookup, and a
  two-hop question (who works where -> that city's code);
- sharegpt.jsonl: short general chat (arithmetic, word games, a little Chinese), some multi-turn,
  a few replies carrying zero-width characters as scraped ShareGPT text does;
- tokenizer/: a byte-level BPE (`longalign.tiny_tokenizer`) trained on that text in both chat
  templates, loadable with AutoTokenizer.from_pretrained;
- stats.json: what was generated.
Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from longalign.storage import atomic_dir, write_json_atomic
from longalign.templates import conversation_text

DEFAULT_SEED = 1234
DEFAULT_NUM_LONG = 300
DEFAULT_NUM_SHORT = 300
DEFAULT_VOCAB_SIZE = 2048
LONG_WORDS_RANGE = (200, 2400)  # filler words per long example: a few hundred to a few thousand tokens
MULTI_TURN_FRACTION = 0.3  # share of short chats with 2-3 rounds
ZERO_WIDTH_FRACTION = 0.05  # share of short replies carrying a U+200B, as scraped ShareGPT does
ZERO_WIDTH_SPACE = "\u200b"

_ADJECTIVES = ("quiet", "bright", "ancient", "small", "green", "heavy", "gentle", "distant", "golden",
               "silent", "rapid", "hidden", "narrow", "warm", "curious", "steady", "broken", "open")
_NOUNS = ("river", "village", "engine", "garden", "library", "mountain", "teacher", "market", "window",
          "harbor", "forest", "bridge", "painter", "station", "lantern", "orchard", "valley", "tower")
_VERBS = ("watches", "follows", "reaches", "crosses", "builds", "remembers", "carries", "finds",
          "leaves", "visits", "guards", "paints", "measures", "opens", "describes", "repairs")
_PREPOSITIONS = ("near", "behind", "across", "under", "beyond", "beside", "above", "inside")
_COLORS = ("red", "blue", "amber", "violet", "silver", "crimson", "teal", "ivory", "black", "jade")
_ANIMALS = ("fox", "heron", "otter", "lynx", "falcon", "badger", "owl", "tortoise", "wolf", "crane")
_SYLLABLES = ("ka", "lo", "mir", "va", "ten", "ros", "ul", "zen", "tor", "bri", "an", "dus", "el", "fin")


def _name(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _code(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _filler_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PREPOSITIONS)} the {rng.choice(_NOUNS)}.")


def _filler(rng: random.Random, words: int) -> list[str]:
    """Sentences of about `words` words (each sentence has 11)."""
    return [_filler_sentence(rng) for _ in range(max(1, words // 11))]


def _insert(rng: random.Random, sentences: list[str], facts: list[str]) -> str:
    """Put each fact at a random position of the filler and join into paragraphs."""
    sentences = list(sentences)
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    return " ".join(sentences)


def _long_words(rng: random.Random) -> int:
    low, high = LONG_WORDS_RANGE  # log-uniform: as many short as long documents per octave
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def kv_retrieval(rng: random.Random) -> tuple[str, str]:
    pairs = {}
    while len(pairs) < max(4, _long_words(rng) // 3):  # about 3 words' worth of tokens per pair
        pairs[f"{_name(rng, 3).lower()}-{rng.randint(100, 999)}"] = _code(rng)
    key = rng.choice(list(pairs))
    table = "\n".join(f"{k}: {v}" for k, v in pairs.items())
    question = f"Here is a table of keys and values.\n\n{table}\n\nWhat is the value of the key {key}?"
    return question, f"The value of the key {key} is {pairs[key]}."


def needle_lookup(rng: random.Random) -> tuple[str, str]:
    color, animal, code = rng.choice(_COLORS), rng.choice(_ANIMALS), _code(rng)
    others = dict.fromkeys((rng.choice(_COLORS), rng.choice(_ANIMALS)) for _ in range(3))  # ordered: seeded
    decoys = [f"The secret code of the {c} {a} is {_code(rng)}." for c, a in others if (c, a) != (color, animal)]
    needle = f"The secret code of the {color} {animal} is {code}."
    document = _insert(rng, _filler(rng, _long_words(rng)), [needle] + decoys)
    question = f"Read the document below.\n\n{document}\n\nWhat is the secret code of the {color} {animal}?"
    return question, needle


def two_hop(rng: random.Random) -> tuple[str, str]:
    agents = list(dict.fromkeys(_name(rng) for _ in range(6)))
    cities = [_name(rng, 3) for _ in agents]
    codes = [_code(rng) for _ in agents]
    facts = [f"Agent {a} works in the city of {c}." for a, c in zip(agents, cities)]
    facts += [f"The city of {c} has the postal code {p}." for c, p in zip(cities, codes)]
    target = rng.randrange(len(agents))
    document = _insert(rng, _filler(rng, _long_words(rng)), facts)
    question = (f"Read the report below.\n\n{document}\n\n"
                f"What is the postal code of the city where Agent {agents[target]} works?")
    answer = f"Agent {agents[target]} works in {cities[target]}, whose postal code is {codes[target]}."
    return question, answer


LONG_TASKS = (kv_retrieval, needle_lookup, two_hop)


def _arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    rounds = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
              (f"And if you multiply that by {c}?", f"{a + b} times {c} is {(a + b) * c}."),
              ("Thanks! Can you check it once more?", f"Sure: ({a} + {b}) x {c} = {(a + b) * c}. It is correct.")]
    return rounds


def _words(rng: random.Random) -> list[tuple[str, str]]:
    words = rng.sample(_NOUNS, rng.randint(3, 6))
    return [(f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words)) + "."),
            ("Now reverse the order.", ", ".join(sorted(words, reverse=True)) + "."),
            ("How many words were there?", f"There were {len(words)} words.")]


def _describe(rng: random.Random) -> list[tuple[str, str]]:
    adjective, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
    sentence = f"A {adjective} {noun} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
    return [(f"Write one sentence about a {adjective} {noun}.", sentence),
            ("Make it shorter.", f"A {adjective} {noun} waits."),
            ("Give it a title.", f"\"The {adjective.capitalize()} {noun.capitalize()}\"")]


def _chinese(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return [(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"),
            ("请用英文回答同样的问题。", f"{a} plus {b} equals {a + b}."),
            ("谢谢！", "不客气。")]


SHORT_TOPICS = (_arithmetic, _words, _describe, _chinese)


def _messages(rounds: list[tuple[str, str]]) -> dict:
    messages = []
    for user, assistant in rounds:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def generate_long(rng: random.Random, count: int) -> list[dict]:
    return [_messages([LONG_TASKS[i % len(LONG_TASKS)](rng)]) for i in range(count)]


def generate_short(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        rounds = SHORT_TOPICS[i % len(SHORT_TOPICS)](rng)
        rounds = rounds[:rng.randint(2, 3)] if rng.random() < MULTI_TURN_FRACTION else rounds[:1]
        if rng.random() < ZERO_WIDTH_FRACTION:
            user, reply = rounds[-1]
            cut = rng.randint(0, len(reply))
            rounds[-1] = (user, reply[:cut] + ZERO_WIDTH_SPACE + reply[cut:])
        rows.append(_messages(rounds))
    return rows


def _tokenizer_corpus(rows: list[dict]) -> list[str]:
    """Every conversation in both chat templates, so template pieces become tokens too."""
    texts = []
    for row in rows:
        msgs = row["messages"]
        rounds = [(u["content"], a["content"]) for u, a in zip(msgs[0::2], msgs[1::2])]
        texts += [conversation_text("chatglm", rounds), conversation_text("llama", rounds)]
    return texts


def write_demo_data(out_dir: str | Path, seed: int = DEFAULT_SEED, num_long: int = DEFAULT_NUM_LONG,
                    num_short: int = DEFAULT_NUM_SHORT, vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict:
    """Generate everything into `out_dir` (replaced atomically); return the stats."""
    from longalign.tiny_tokenizer import train_tiny_tokenizer

    rng = random.Random(seed)
    long_rows, short_rows = generate_long(rng, num_long), generate_short(rng, num_short)
    with atomic_dir(out_dir, stage="demo_data", overwrite=True) as tmp:  # --out is replaced whole
        for name, rows in (("long.jsonl", long_rows), ("sharegpt.jsonl", short_rows)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        train_tiny_tokenizer(_tokenizer_corpus(long_rows + short_rows), tmp / "tokenizer", vocab_size)
        stats = {"seed": seed, "long_rows": len(long_rows), "short_rows": len(short_rows),
                 "vocab_size": vocab_size,
                 "long_chars": sum(len(r["messages"][0]["content"]) for r in long_rows),
                 "short_multi_turn": sum(len(r["messages"]) > 2 for r in short_rows),
                 "short_with_zero_width": sum(ZERO_WIDTH_SPACE in json.dumps(r, ensure_ascii=False)
                                              for r in short_rows)}
        write_json_atomic(tmp / "stats.json", stats)
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--num_long", type=int, default=DEFAULT_NUM_LONG)
    parser.add_argument("--num_short", type=int, default=DEFAULT_NUM_SHORT)
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    for name in ("num_long", "num_short", "vocab_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    stats = write_demo_data(args.out, args.seed, args.num_long, args.num_short, args.vocab_size)
    print(json.dumps({"out": args.out, **stats}))


if __name__ == "__main__":
    main()
