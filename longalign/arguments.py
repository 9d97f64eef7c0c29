"""argparse value types shared by the stages' command lines: argparse refuses a bad value naming
its flag (`error: argument --seed: expected an integer >= 0, got -1`), before any work."""
from __future__ import annotations

import argparse


def non_negative_int(text: str) -> int:
    """An integer >= 0, e.g. a seed (numpy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


SEED_LIMIT = 2 ** 32  # numpy.random.seed, which transformers' set_seed calls, takes [0, 2**32)


def check_seed(flag: str, value: int | None) -> None:
    """A ValueError naming `flag` unless `value` is None or a seed in [0, SEED_LIMIT)."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{flag} must be an integer in [0, 2**32), got {value}")
