"""The line separators `str.splitlines` splits at and `json.dumps(ensure_ascii=False)` writes raw:
a JSONL record holding one must still read back as one record (storage and eval tests)."""

LINE_SEPARATORS = ["\u0085", "\u2028", "\u2029"]
