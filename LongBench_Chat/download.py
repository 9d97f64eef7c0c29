"""Download the official LongBench-Chat files into --data_dir and check their schema.

    python LongBench_Chat/download.py [--data_dir data/longbench_chat] [--base_url URL] [--overwrite]

Fetches test_cases.json, few_shots.json and prompt_fs.txt from --base_url (default: the THUDM
LongAlign release, see README.md); files already present are kept unless --overwrite.
"""
from __future__ import annotations

import argparse
import sys


from lbc_data import DEFAULT_BASE_URL, download


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/longbench_chat")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    report = download(args.data_dir, args.base_url, args.overwrite)
    print(f"[download] {report}")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad input: the message says what to do
        sys.exit(f"[download] ERROR: {err}")
