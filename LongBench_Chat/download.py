"""Download the official LongBench-Chat files into --data_dir, checked before anything is written.

    python LongBench_Chat/download.py [--data_dir data/longbench_chat] [--base_url URL] [--overwrite]

Fetches test_cases.json, few_shots.json and prompt_fs.txt from --base_url (default: the
LongBench_Chat/ folder of THUDM/LongAlign, see README.md) and checks them (schema, 50 cases, idx
1..50, every few-shot answer and score present); on any problem it lists them all and writes
nothing. Files already present are kept (and checked with the new ones) unless --overwrite.
Offline: put a copy of the three files in a folder and pass it as --data_dir to eval.py.
"""
from __future__ import annotations

import argparse
import json
import sys


from longalign.eval.longbench_chat.data import DEFAULT_BASE_URL, OFFICIAL_NUM_CASES, download


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/longbench_chat")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--expected_cases", type=int, default=OFFICIAL_NUM_CASES)
    args = p.parse_args(argv)
    report = download(args.data_dir, args.base_url, args.overwrite, args.expected_cases)
    print(f"[download] {json.dumps(report, indent=2)}")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad input or bad files: the message lists every problem
        sys.exit(f"[download] ERROR: {err}")
