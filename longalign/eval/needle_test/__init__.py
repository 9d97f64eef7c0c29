"""The needle-in-a-haystack test: contexts, prompt sets and scoring behind Needle_test/*.py."""
