"""Helpers the tests share (not tests themselves): fault injection and CLI runs, tiny models and
tokenizers built on the spot, train.py runs on tiny models and the suite's one torchrun launch (its
pytest side, its worker, its cases), pre_tokenize inputs, LongBench-Chat data, stubbed script runs,
a loopback OpenAI-compatible server."""
