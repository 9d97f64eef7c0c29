"""LongBench-Chat evaluation (paper §3.4): `python LongBench_Chat/eval.py --model ... --max_length ...`."""
