"""Stages 1-2 of the pipeline: conversations -> tokenized dataset -> sorted groups and packs, and their checks."""
