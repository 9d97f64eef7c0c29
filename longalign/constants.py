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
