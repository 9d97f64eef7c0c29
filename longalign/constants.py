"""Constants shared by every stage. One place, so no stage hard-codes its own copy."""

IGNORE_INDEX = -100  # label value that the loss skips (PyTorch's cross_entropy default)
DEFAULT_MAX_LENGTH = 65536  # the paper's 64k training context
MODEL_FAMILIES = ("chatglm", "llama")
DEFAULT_TOKENIZERS = {  # released LongAlign models, whose tokenizers the data was built with
    "chatglm": "THUDM/LongAlign-6B-64k",
    "llama": "THUDM/LongAlign-7B-64k",
}
LONGALIGN_HF_DATASET = "THUDM/LongAlign-10k"
ZERO_WIDTH_CHARS = ("\u200b", "\u200c", "\u200d", "\ufeff")
ZERO_WIDTH_TABLE = str.maketrans(dict.fromkeys(ZERO_WIDTH_CHARS))  # text.translate(...) removes them
TOKEN_COLUMNS = ("input_ids", "labels")  # DESIGN.md §1: the columns every tokenized dataset has
DEFAULT_GROUP_SIZE = 8  # sequences (sort) or packs (pack) per data-parallel step: the paper's 8 GPUs
# best-fit-decreasing (default), the paper's greedy walk, or the original code's greedy rule for rule
PACK_STRATEGIES = ("bfd", "greedy", "greedy_original")
# Rows are materialised with Arrow `take` in chunks of about this many tokens, to bound memory
# (~0.5 GiB of int32 per column per chunk) and keep every chunk's int32 list offsets in range.
MATERIALIZE_CHUNK_TOKENS = 1 << 27
LEFT_TRUNCATION_KEEP_HEAD = 2  # --truncate left keeps this many leading tokens (e.g. [gMASK]sop, BOS+1)
TRUNCATION_MODES = ("right", "left", "skip")
DEFAULT_LONG_JSONL = "data/raw/long.jsonl"
DEFAULT_SHORT_JSONL = "data/raw/sharegpt.jsonl"


def check_family(family: str) -> str:
    """`family` if it is one of MODEL_FAMILIES, else a ValueError naming the choices."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")
    return family
