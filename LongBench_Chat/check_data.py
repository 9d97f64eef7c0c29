"""Check the LongBench-Chat files in --data_dir; print what they hold or exactly what is wrong.

    python LongBench_Chat/check_data.py [--data_dir data/longbench_chat]
"""
from __future__ import annotations

import argparse
import sys


from lbc_data import DataError, load_data
from lbc_score import detect_language


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/longbench_chat")
    args = p.parse_args(argv)
    try:
        data = load_data(args.data_dir)
    except DataError as err:
        print(f"[check] ERROR: {err}", file=sys.stderr)
        return 1
    languages = [detect_language(case["query"]) for case in data.cases]
    print(f"[check] OK: {len(data.cases)} cases ({languages.count('en')} English, {languages.count('zh')} Chinese), "
          f"{len(data.few_shots)} few-shot sets, judge template of {len(data.template)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
