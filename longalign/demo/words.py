"""Words of the demo's generated text: word lists, made-up names and places, filler sentences.

Shared by the demo's pretraining corpus (`longalign.demo.corpus`), its long tasks
(`longalign.demo.tasks`) and its short chats (`longalign.demo.data`). `FORBIDDEN` lists what no
generated text may contain: the needle test's needle (Needle_test/demo.sh) and the evaluation's
held-out needle wording (`longalign.demo.tasks.HELD_OUT_TASKS`); the word lists avoid them
and `nonsense_word` rejects them.
"""
from __future__ import annotations

import random
import string

FORBIDDEN = ("san francisco", "sandwich", "dolores", "sunny", "magic", "special")
ADJECTIVES = ("quiet", "bright", "ancient", "small", "green", "heavy", "gentle", "distant", "golden",
               "silent", "rapid", "hidden", "narrow", "warm", "curious", "steady", "broken", "open",
               "old", "young", "cold", "wide", "dark", "early", "late", "simple", "strange", "careful")
NOUNS = ("river", "village", "engine", "garden", "library", "mountain", "teacher", "market", "window",
          "harbor", "forest", "bridge", "painter", "station", "lantern", "orchard", "valley", "tower",
          "school", "letter", "kitchen", "island", "farmer", "road", "castle", "boat", "story", "field",
          "museum", "doctor", "clock", "garage", "meadow", "theater", "baker", "temple", "shop", "lake")
VERBS = ("watches", "follows", "reaches", "crosses", "builds", "remembers", "carries", "finds",
          "leaves", "visits", "guards", "paints", "measures", "opens", "describes", "repairs",
          "notices", "studies", "cleans", "counts", "draws", "moves")
PAST_VERBS = ("saw", "built", "found", "left", "visited", "painted", "opened", "described", "repaired",
               "studied", "cleaned", "counted", "drew", "moved", "carried", "remembered")
PREPOSITIONS = ("near", "behind", "across", "under", "beyond", "beside", "above", "inside", "around")
TIMES = ("morning", "evening", "night", "winter", "summer", "spring", "autumn", "afternoon")
CONNECTIVES = ("Later", "Meanwhile", "After that", "Of course", "In the end", "Every year", "Sometimes")
# Needle words: none of them occurs in the filler, so the needle stands out as the test's does.
ACTIVITY_VERBS = ("walk along", "swim in", "read beside", "climb", "sketch", "explore", "row across",
                   "photograph", "picnic near", "listen to", "cycle around", "sail past")
ACTIVITY_ADJECTIVES = ("famous", "tall", "crowded", "peaceful", "colorful", "wooden", "enormous", "tiny")
ACTIVITY_OBJECTS = ("lighthouse", "waterfall", "canal", "pier", "cathedral", "vineyard", "aquarium",
                     "fountain", "observatory", "zoo", "carousel", "glacier")
ACTIVITY_SECOND = ("drink cocoa", "buy pretzels", "watch the ferries", "play chess", "fly a kite",
                    "feed the pigeons", "hear the choir", "ride a tram", "eat noodles", "taste cheese")
PLACE_WORDS = ("Plaza", "Pier", "Heights", "Bay", "Gardens", "Bazaar", "Quay", "Pavilion")
WEATHER = ("windy", "rainy", "foggy", "snowy", "calm", "cloudy", "misty", "frosty")
DAYS = ("day", "weekend", "holiday", "Sunday", "Friday")
SYLLABLES = ("ka", "lo", "mir", "va", "ten", "ros", "ul", "zen", "tor", "bri", "an", "dus", "el", "fin",
              "gar", "ho", "jun", "pel", "qui", "wex", "yor", "cas", "ni", "mo", "tre", "sil")
CHINESE_NUMERAL_REPLY = "{a}加{b}等于{c}。"


def name(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def code(rng: random.Random, digits: int = 5) -> str:
    """A random number of `digits` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


# ---- filler text ---------------------------------------------------------------------------
def sentence(rng: random.Random) -> str:
    a, n, c = rng.choice, rng.choice(NOUNS), rng.random()
    if c < 0.4:
        return f"The {a(ADJECTIVES)} {n} {a(VERBS)} the {a(ADJECTIVES)} {a(NOUNS)} {a(PREPOSITIONS)} the {a(NOUNS)}."
    if c < 0.6:
        return f"{name(rng)} {a(PAST_VERBS)} {rng.randint(2, 40)} old {n}s {a(PREPOSITIONS)} the {a(NOUNS)}."
    if c < 0.8:
        return f"{a(CONNECTIVES)}, the {n} was {a(ADJECTIVES)} in the {a(TIMES)}."
    return f"In the {a(TIMES)} the {a(NOUNS)} {a(VERBS)} a {a(ADJECTIVES)} {n}, and nobody {a(PAST_VERBS)} it."


def filler(rng: random.Random, words: int) -> list[str]:
    """Sentences of about `words` words in total (a sentence has about 10)."""
    return [sentence(rng) for _ in range(max(1, words // 10))]


def essay(rng: random.Random, words: int) -> str:
    """Filler sentences in paragraphs of 3-8 sentences."""
    sentences, paragraphs = filler(rng, words), []
    while sentences:
        size = rng.randint(3, 8)
        paragraphs.append(" ".join(sentences[:size]))
        sentences = sentences[size:]
    return "\n\n".join(paragraphs)


def nonsense_word(rng: random.Random) -> str:
    """2-7 random lower-case letters (occasionally capitalised) containing no FORBIDDEN word."""
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        if not any(bad in word for bad in FORBIDDEN):
            return word.capitalize() if rng.random() < 0.2 else word


def place(rng: random.Random) -> str:
    """A made-up place: 'Kalomir', 'Port Tenros', 'Zenva Bay'."""
    kind = rng.random()
    if kind < 0.4:
        return name(rng, rng.randint(2, 3))
    if kind < 0.7:
        return f"{name(rng)} {rng.choice(PLACE_WORDS)}"
    return f"{name(rng)} {name(rng)}"


def activity(rng: random.Random) -> str:
    """'sketch the famous pier and eat noodles in Mirva Plaza on a foggy weekend', shorter forms."""
    first = f"{rng.choice(ACTIVITY_VERBS)} the {rng.choice(ACTIVITY_ADJECTIVES)} {rng.choice(ACTIVITY_OBJECTS)}"
    if rng.random() < 0.3:
        return first
    second = f"{rng.choice(ACTIVITY_SECOND)} in {name(rng)} {rng.choice(PLACE_WORDS)}"
    if rng.random() < 0.4:
        return f"{first} and {second}"
    return f"{first} and {second} on a {rng.choice(WEATHER)} {rng.choice(DAYS)}"

