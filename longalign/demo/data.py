"""The embedded default: seeded synthetic long-context + short chat data, and a tokenizer for it.

    python -m longalign.demo.data --out data/demo/raw

writes, in the `messages` format of LongAlign-10k / ShareGPT,
- long.jsonl: long inputs with short answers, over generated filler text, answer copied from the
  context (learnable by copying; `longalign.demo.evaluation` measures whether a model did): needle
  retrieval (one sentence "The best thing to do in <place> is ..." hidden at a random depth,
  asked with the needle test's own question form; its words never occur in the filler) and
  key-value lookup (facts "The access code of <name> is <5 digits>." for a few names scattered
  in the document, one asked);
- sharegpt.jsonl: short inputs with long answers (counting, multiplication tables, spelling,
  repeating, sorting, a little Chinese), some multi-turn, a few replies carrying zero-width
  characters as scraped ShareGPT text does;
  that is `SHORT_TOPICS`, the mix `base` and the default; `--mix` picks another of `SHORT_MIXES`
  (copying distinct-word lists, mixed items, filler passages: bench/demo_sweep.py tries them).
  `make demo` writes `few_words` -- copy 4-16 distinct filler words, copy them again, count them --
  with a 384-entry tokenizer: the mix and size in which its tiny model learns to copy within the
  CPU budget (BENCHMARKS.md section 11);
- haystack/: filler essays for the needle test, generated from a different seed;
- tokenizer/: a byte-level BPE (`longalign.demo.tiny_tokenizer`) trained on that text in both chat
  templates, loadable with AutoTokenizer.from_pretrained;
- stats.json: what was generated.
Same seed, same bytes. The needle test's own needle (San Francisco, a sandwich, Dolores Park, a
sunny day) is never generated: none of its words are in the word lists (tested).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from longalign.demo.tasks import DEFAULT_LONG_WORDS, generate_long, messages_row
from longalign.demo.words import (ACTIVITY_ADJECTIVES, ACTIVITY_OBJECTS, ACTIVITY_SECOND, ACTIVITY_VERBS,
                                  ADJECTIVES, CHINESE_NUMERAL_REPLY, NOUNS, PAST_VERBS, PLACE_WORDS, PREPOSITIONS,
                                  TIMES, VERBS, WEATHER, code, essay, filler, name, sentence)
from longalign.storage import atomic_dir, write_json_atomic
from longalign.data.training_format import conversation_text

DEFAULT_SEED = 1234
HAYSTACK_SEED_OFFSET = 7919  # the needle test's filler comes from seed + this (not the training text)
DEFAULT_NUM_LONG = 1200
DEFAULT_NUM_SHORT = 1200
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_MIX = "base"  # the short-task mix (SHORT_MIXES); scripts/demo.sh picks its own
HAYSTACK_FILES = 4
HAYSTACK_WORDS = 3000  # per haystack file
MULTI_TURN_FRACTION = 0.5  # share of short chats with 2-3 rounds
ZERO_WIDTH_FRACTION = 0.05  # share of short replies carrying a U+200B, as scraped ShareGPT does
ZERO_WIDTH_SPACE = "\u200b"


# ---- short tasks: short input, long answer ---------------------------------------------------
def _count(rng: random.Random) -> list[tuple[str, str]]:
    start = rng.randint(1, 80)
    stop = start + rng.randint(15, 40)
    numbers = ", ".join(str(i) for i in range(start, stop + 1))
    return [(f"Count from {start} to {stop}.", f"{numbers}."),
            ("Now count back down.", ", ".join(str(i) for i in range(stop, start - 1, -1)) + "."),
            ("How many numbers was that?", f"That was {stop - start + 1} numbers.")]


def _table(rng: random.Random) -> list[tuple[str, str]]:
    n = rng.randint(2, 19)
    lines = "\n".join(f"{n} x {i} = {n * i}" for i in range(1, 11))
    return [(f"Write the multiplication table of {n}.", lines),
            ("What is the last line?", f"{n} x 10 = {n * 10}."),
            ("Thanks!", "You are welcome.")]


def _spell(rng: random.Random) -> list[tuple[str, str]]:
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(4, 8))
    spelled = "\n".join(f"{w}: {'-'.join(w)}" for w in words)
    return [(f"Spell these words letter by letter: {', '.join(words)}.", spelled),
            ("Sort them alphabetically.", ", ".join(sorted(words)) + "."),
            ("Now reverse that order.", ", ".join(sorted(words, reverse=True)) + ".")]


def _repeat(rng: random.Random) -> list[tuple[str, str]]:
    said, times = sentence(rng), rng.randint(3, 5)
    return [(f"Repeat this sentence {times} times: {said}", " ".join([said] * times)),
            ("Once more, in capitals.", said.upper()),
            ("Good.", "Thank you.")]


def _copy_names(rng: random.Random) -> list[tuple[str, str]]:
    names = [name(rng, rng.randint(2, 4)) for _ in range(rng.randint(5, 12))]
    return [(f"Copy this list of names: {', '.join(names)}.", ", ".join(names) + "."),
            ("Now write them one per line.", "\n".join(names)),
            ("What was the first name?", f"The first name was {names[0]}.")]


def _copy_codes(rng: random.Random) -> list[tuple[str, str]]:
    codes = [code(rng) for _ in range(rng.randint(5, 12))]
    return [(f"Copy these codes: {', '.join(codes)}.", ", ".join(codes) + "."),
            ("Again, one per line.", "\n".join(codes)),
            ("Which code came last?", f"The last code was {codes[-1]}.")]


def _chinese(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return [(f"{a}加{b}等于多少？请写出过程。", f"{a}加{b}：先算个位，再算十位。" + CHINESE_NUMERAL_REPLY.format(a=a, b=b, c=a + b)),
            ("请用英文回答同样的问题。", f"{a} plus {b} equals {a + b}."),
            ("谢谢！", "不客气。")]


def _filler_words() -> tuple[str, ...]:
    return tuple(dict.fromkeys(ADJECTIVES + NOUNS + VERBS + PAST_VERBS + PREPOSITIONS + TIMES))


def _copy_rounds(question: str, words: str) -> list[tuple[str, str]]:
    """A copy chat: `question` answered with `words`, then once more, then their count."""
    return [(question, words), ("Once more.", words),
            ("How many words was that?", f"That was {len(words.split())} words.")]


def _copy_words(rng: random.Random, fewest: int = 8, most: int = 40) -> list[tuple[str, str]]:
    words = " ".join(rng.sample(_filler_words(), rng.randint(fewest, most)))
    return _copy_rounds(f"Copy these words exactly:\n{words}", words)


def _copy_few_words(rng: random.Random) -> list[tuple[str, str]]:
    return _copy_words(rng, 4, 16)


def _activity_words() -> tuple[str, ...]:
    phrases = ACTIVITY_VERBS + ACTIVITY_ADJECTIVES + ACTIVITY_OBJECTS + ACTIVITY_SECOND + PLACE_WORDS + WEATHER
    return tuple(dict.fromkeys(w for phrase in phrases for w in phrase.split()))


def _copy_items(rng: random.Random) -> list[tuple[str, str]]:
    """4-16 items to copy, each a filler word, a made-up name, a code or a needle activity word."""
    pools = (_filler_words(), _activity_words())
    items = []
    for _ in range(rng.randint(4, 16)):
        kind = rng.random()
        items.append(rng.choice(pools[0]) if kind < 0.4 else rng.choice(pools[1]) if kind < 0.6
                     else name(rng, rng.randint(1, 3)) if kind < 0.85 else code(rng))
    text = " ".join(items)  # every item is one word
    return _copy_rounds(f"Copy these words exactly:\n{text}", text)


def _copy_marked_words(rng: random.Random) -> list[tuple[str, str]]:
    """`_copy_few_words` with the list between filler passages: copied by finding it, not by place."""
    words = " ".join(rng.sample(_filler_words(), rng.randint(4, 16)))
    before, after = (" ".join(filler(rng, rng.randint(0, 60))) for _ in range(2))
    return _copy_rounds(f"{before}\nWords: {words}\n{after}\nCopy the words exactly.", words)


def _repeat_passage(rng: random.Random) -> list[tuple[str, str]]:
    passage = " ".join(filler(rng, rng.randint(20, 80)))
    return [(f"Repeat this passage word for word:\n{passage}", passage),
            ("What was its first sentence?", passage.split(".")[0] + "."),
            ("Thanks.", "You are welcome.")]


# In turn; copying-heavy (7 of 11: what retrieval needs), the rest counting, tables, spelling, Chinese.
SHORT_TOPICS = (_copy_names, _copy_codes, _repeat, _count, _copy_names, _spell, _copy_codes, _table,
                _copy_names, _repeat, _chinese)
SHORT_MIXES = {"base": SHORT_TOPICS, "only_words": (_copy_words,), "few_words": (_copy_few_words,),
               "few_words_passages": (_copy_few_words, _repeat_passage), "items": (_copy_items,),
               "marked_words": (_copy_few_words, _copy_marked_words),
               "few_words_base": tuple(t for topic in SHORT_TOPICS for t in (_copy_few_words, topic)),
               "copy2": (_copy_words, _repeat_passage, _copy_words, _copy_names, _count, _copy_words,
                         _repeat_passage, _copy_codes, _table, _copy_words, _spell, _repeat, _chinese),
               "words": (_copy_words, _repeat_passage) + SHORT_TOPICS,
               "copy": (_copy_words, _repeat_passage, _copy_words, _repeat_passage, _copy_names, _copy_codes,
                        _count, _table, _spell, _chinese)}


def generate_short(rng: random.Random, count: int, topics=SHORT_TOPICS) -> list[dict]:
    rows = []
    for i in range(count):
        rounds = topics[i % len(topics)](rng)
        rounds = rounds[:rng.randint(2, 3)] if rng.random() < MULTI_TURN_FRACTION else rounds[:1]
        if rng.random() < ZERO_WIDTH_FRACTION:
            user, reply = rounds[-1]
            cut = rng.randint(0, len(reply))
            rounds[-1] = (user, reply[:cut] + ZERO_WIDTH_SPACE + reply[cut:])
        rows.append(messages_row(rounds))
    return rows


def generate_haystack(seed: int, files: int = HAYSTACK_FILES, words: int = HAYSTACK_WORDS) -> list[str]:
    """Filler essays for the needle test, from their own seed (no needle, no table)."""
    rng = random.Random(seed + HAYSTACK_SEED_OFFSET)
    return [essay(rng, words) for _ in range(files)]


def rounds_of(row: dict) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a generated row (the inverse of `_messages`)."""
    messages = row["messages"]
    return [(u["content"], a["content"]) for u, a in zip(messages[0::2], messages[1::2])]


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """Every conversation in both chat templates, so template pieces become tokens too."""
    texts = []
    for row in rows:
        rounds = rounds_of(row)
        texts += [conversation_text("chatglm", rounds), conversation_text("llama", rounds)]
    return texts


def copy_tokenizer(model_dir: str | Path, out_dir: Path) -> int:
    """Save the tokenizer of `model_dir` (loaded without remote code) to `out_dir`; its size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(out_dir))
    return len(tokenizer)


def write_demo_data(out_dir: str | Path, seed: int = DEFAULT_SEED, num_long: int = DEFAULT_NUM_LONG,
                    num_short: int = DEFAULT_NUM_SHORT, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    long_words: tuple[int, int] = DEFAULT_LONG_WORDS, mix: str = DEFAULT_MIX,
                    tokenizer_from: str | Path | None = None) -> dict:
    """Generate everything into `out_dir` (replaced atomically); return the stats. `mix` names
    the short-task mix (`SHORT_MIXES`); `tokenizer_from` a model folder whose tokenizer is copied
    to tokenizer/ (the demo's pretrained base) instead of training one of `vocab_size`."""
    from longalign.demo.tiny_tokenizer import train_tiny_tokenizer

    if mix not in SHORT_MIXES:
        raise ValueError(f"unknown short-task mix {mix!r}; known: {sorted(SHORT_MIXES)}")
    rng = random.Random(seed)
    long_rows = generate_long(rng, num_long, long_words)
    short_rows = generate_short(rng, num_short, SHORT_MIXES[mix])
    haystack = generate_haystack(seed)
    with atomic_dir(out_dir, stage="demo_data", overwrite=True) as tmp:  # --out is replaced whole
        for file_name, rows in (("long.jsonl", long_rows), ("sharegpt.jsonl", short_rows)):
            with open(tmp / file_name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (tmp / "haystack").mkdir()
        for index, text in enumerate(haystack):
            (tmp / "haystack" / f"essay{index:02d}.txt").write_text(text, encoding="utf-8")
        if tokenizer_from is None:
            vocab_size = len(train_tiny_tokenizer(tokenizer_corpus(long_rows + short_rows), tmp / "tokenizer", vocab_size))
        else:
            vocab_size = copy_tokenizer(tokenizer_from, tmp / "tokenizer")
        stats = {"seed": seed, "haystack_seed": seed + HAYSTACK_SEED_OFFSET, "long_rows": len(long_rows),
                 "short_rows": len(short_rows), "short_mix": mix, "vocab_size": vocab_size,
                 "tokenizer_from": None if tokenizer_from is None else str(tokenizer_from),
                 "long_words": list(long_words),
                 "long_chars": sum(len(r["messages"][0]["content"]) for r in long_rows),
                 "short_chars": sum(len(m["content"]) for r in short_rows for m in r["messages"]),
                 "haystack_files": len(haystack),
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
    parser.add_argument("--tokenizer_from", default=None,
                        help="copy this model folder's tokenizer (default: train a BPE of --vocab_size)")
    parser.add_argument("--mix", default=DEFAULT_MIX, choices=sorted(SHORT_MIXES), help="short-task mix (SHORT_MIXES)")
    parser.add_argument("--long_words", type=int, nargs=2, default=list(DEFAULT_LONG_WORDS),
                        metavar=("MIN", "MAX"), help="filler words per long example (log-uniform)")
    args = parser.parse_args(argv)
    for field_name in ("num_long", "num_short", "vocab_size"):
        if getattr(args, field_name) < 0:
            parser.error(f"--{field_name} must be >= 0")
    if not 1 <= args.long_words[0] <= args.long_words[1]:
        parser.error("--long_words needs 1 <= MIN <= MAX")
    stats = write_demo_data(args.out, args.seed, args.num_long, args.num_short, args.vocab_size,
                            tuple(args.long_words), args.mix, args.tokenizer_from)
    print(json.dumps({"out": args.out, **stats}))


if __name__ == "__main__":
    main()
