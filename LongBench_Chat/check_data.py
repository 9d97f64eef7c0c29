"""Check the LongBench-Chat files in --data_dir; print what they hold or every problem found.

    python LongBench_Chat/check_data.py [--data_dir data/longbench_chat] [--expected_cases 50]
"""
from __future__ import annotations

import argparse
import sys


from longalign.eval.longbench_chat.data import OFFICIAL_NUM_CASES, DataError, load_data
from longalign.eval.longbench_chat.score import detect_language

OFFICIAL_WORDS = {True: "the official release's", False: "NOT the official release's", None: "no reference hash"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/longbench_chat")
    p.add_argument("--expected_cases", type=int, default=OFFICIAL_NUM_CASES)
    args = p.parse_args(argv)
    try:
        data = load_data(args.data_dir, args.expected_cases)
    except DataError as err:
        print(f"[check] ERROR: {err}", file=sys.stderr)
        return 1
    languages = [detect_language(case["query"]) for case in data.cases]
    print(f"[check] OK: {len(data.cases)} cases ({languages.count('en')} English, {languages.count('zh')} Chinese), "
          f"{len(data.few_shots)} few-shot sets, judge template of {len(data.template)} characters")
    for name, info in data.provenance().items():
        print(f"[check] {name}: sha256 {info['sha256']} ({OFFICIAL_WORDS[info['official']]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
