"""Helpers the tests share (not tests themselves): fault injection and CLI runs, tiny models and
tokenizers built on the spot, a loopback OpenAI-compatible server."""
