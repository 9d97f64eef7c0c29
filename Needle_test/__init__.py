"""Needle-in-a-haystack test for HF models: prompt.py → pred.py → eval.py → vis.py."""
