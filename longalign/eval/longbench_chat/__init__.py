"""LongBench-Chat (50 long real-world queries, GPT-4 judge with scored few-shot examples): data, scoring and the run logic behind LongBench_Chat/*.py."""
