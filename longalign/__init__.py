"""LongAlign: long-context instruction tuning (Bai et al., 2024) — shared components.

Top-level scripts (pre_tokenize.py, sort_and_group.py, train.py, ...) are thin entry points
over this package; see README.md for the file tree.
"""
