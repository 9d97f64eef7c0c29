"""LongBench-Chat data: the three files of the official release, their download and their check.

The release is the `LongBench_Chat/` folder of THUDM/LongAlign (branch main):
- `test_cases.json`: a list of 50 `{"idx": int, "query": str, "prompt": str, "answer": str}`,
  idx 1..50 in order; `prompt` is the long document followed by the question (what the model
  reads), `query` the question alone (what the judge reads), `answer` the reference answer;
- `few_shots.json`: a list with one entry per case in idx order, each a list of 3
  `{"answer": str, "score": int 1-10}` — the judge's scored example answers;
- `prompt_fs.txt`: the judge's few-shot template, a `str.format` text with 9 `{}` slots:
  question, reference answer, (example answer, example score) x 3, the answer to rate.

`check_texts` reports every problem of every file (not only the first), each naming its file
and case; `download` checks what it fetched before writing anything; `load_data` reads a folder
(`--data_dir`, e.g. a copy the user provides offline) and checks it the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from longalign.storage import write_bytes_atomic

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/THUDM/LongAlign/main/LongBench_Chat"
TEST_CASES = "test_cases.json"
FEW_SHOTS = "few_shots.json"
TEMPLATE = "prompt_fs.txt"
DATA_FILES = (TEST_CASES, FEW_SHOTS, TEMPLATE)
OFFICIAL_NUM_CASES = 50
# sha256 of the release's files at THUDM/LongAlign main (last changed in commit 517e97b, 2024-01-31),
# computed from a snapshot of that repository; test_cases.json (> 4 MiB) was not in the snapshot.
OFFICIAL_SHA256 = {
    TEMPLATE: "c68efc995bfd8ea586012b91ec59c1b12687f462ab4c1a12e6935056dbe76ef7",
    FEW_SHOTS: "1849e4141863b65c2ac5728f8cfb5d1bfbe870cbd36e2c58fc79108755b4178d",
}
CASE_FIELDS = {"idx": int, "query": str, "prompt": str, "answer": str}
SHOTS_PER_CASE = 3
SCORE_RANGE = (1, 10)
TEMPLATE_SLOTS = 3 + 2 * SHOTS_PER_CASE  # question, reference, 3 x (answer, score), prediction
DOWNLOAD_TIMEOUT_S = 60
MAX_PROBLEMS_SHOWN = 20
LFS_POINTER_PREFIX = "version https://git-lfs"
HTML_PREFIXES = ("<!doctype", "<html")


class DataError(ValueError):
    """A LongBench-Chat data file is missing or does not have the expected schema."""


@dataclass
class LongBenchChatData:
    cases: list[dict]
    few_shots: list[list[dict]]
    template: str
    sha256: dict  # file name -> sha256 of its bytes

    def shots_for(self, case: dict) -> list[dict]:
        return self.few_shots[case["idx"] - 1]

    def provenance(self) -> dict:
        """Per file: its sha256 and whether it is the official release's (None: not known here)."""
        return {name: {"sha256": digest, "official": (digest == OFFICIAL_SHA256[name])
                       if name in OFFICIAL_SHA256 else None} for name, digest in self.sha256.items()}


def _parse_json(name: str, text: str, problems: list[str]):
    head = text.lstrip()[:200].lower()
    if not head:
        problems.append(f"{name}: the file is empty")
    elif head.startswith(LFS_POINTER_PREFIX):
        problems.append(f"{name}: a Git LFS pointer, not the data (fetch the LFS object)")
    elif head.startswith(HTML_PREFIXES):
        problems.append(f"{name}: an HTML page, not JSON (a wrong URL or a login page?)")
    else:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{name}: not valid JSON ({err})")
    return None


def case_problems(cases, expected_cases: int | None) -> list[str]:
    where = TEST_CASES
    if not isinstance(cases, list) or not cases:
        return [f"{where}: expected a non-empty JSON list of cases, got {type(cases).__name__}"]
    problems = []
    if expected_cases is not None and len(cases) != expected_cases:
        problems.append(f"{where}: {len(cases)} cases, expected {expected_cases} (the official release has "
                        f"{OFFICIAL_NUM_CASES}; --expected_cases for another set)")
    for position, case in enumerate(cases):
        if not isinstance(case, dict):
            problems.append(f"{where}: case #{position} is {type(case).__name__}, expected an object")
            continue
        for name, kind in CASE_FIELDS.items():
            if name not in case:
                problems.append(f"{where}: case #{position} has no field {name!r} (fields: {sorted(case)})")
            elif not isinstance(case[name], kind) or isinstance(case[name], bool):
                problems.append(f"{where}: case #{position} field {name!r} is {type(case[name]).__name__}, "
                                f"expected {kind.__name__}")
        if isinstance(case.get("idx"), int) and case["idx"] != position + 1:
            problems.append(f"{where}: case #{position} has idx {case['idx']}, expected {position + 1} "
                            f"(idx must be 1..N in order: few_shots.json is matched by position)")
    return problems


def few_shot_problems(few_shots, num_cases: int) -> list[str]:
    where = FEW_SHOTS
    if not isinstance(few_shots, list) or len(few_shots) != num_cases:
        got = len(few_shots) if isinstance(few_shots, list) else type(few_shots).__name__
        return [f"{where}: expected a list of {num_cases} entries (one per case), got {got}"]
    problems = []
    low, high = SCORE_RANGE
    for position, shots in enumerate(few_shots):
        if not isinstance(shots, list) or len(shots) != SHOTS_PER_CASE:
            problems.append(f"{where}: entry #{position} (idx {position + 1}) must be a list of "
                            f"{SHOTS_PER_CASE} scored answers")
            continue
        for k, shot in enumerate(shots):
            answer = shot.get("answer") if isinstance(shot, dict) else None
            if not isinstance(answer, str) or not answer.strip():
                problems.append(f"{where}: idx {position + 1} shot {k} has no answer text")
            score = shot.get("score") if isinstance(shot, dict) else None
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not low <= score <= high:
                problems.append(f"{where}: idx {position + 1} shot {k} has score {score!r}, "
                                f"expected a number in [{low}, {high}]")
    return problems


def template_problems(template: str) -> list[str]:
    try:
        slots = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        return [f"{TEMPLATE}: not a valid format template ({err})"]
    if len(slots) != TEMPLATE_SLOTS or any(name != "" for name in slots):
        return [f"{TEMPLATE}: expected {TEMPLATE_SLOTS} positional '{{}}' slots, found {len(slots)} ({slots!r})"]
    return []


def check_texts(texts: dict, expected_cases: int | None = OFFICIAL_NUM_CASES) -> tuple[dict | None, list[str]]:
    """(parsed files, problems) for the three files' texts; the parsed files only when no problem."""
    problems: list[str] = []
    cases = _parse_json(TEST_CASES, texts[TEST_CASES], problems)
    few_shots = _parse_json(FEW_SHOTS, texts[FEW_SHOTS], problems)
    if cases is not None:
        problems += case_problems(cases, expected_cases)
    if few_shots is not None:
        num_cases = len(cases) if isinstance(cases, list) else expected_cases or OFFICIAL_NUM_CASES
        problems += few_shot_problems(few_shots, num_cases)
    problems += template_problems(texts[TEMPLATE])
    if problems:
        return None, problems
    return {TEST_CASES: cases, FEW_SHOTS: few_shots, TEMPLATE: texts[TEMPLATE]}, []


def _problem_report(where, problems: list[str]) -> str:
    shown = "\n  - ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return f"{where}: {len(problems)} problem(s):\n  - {shown}{more}"


def _decode(name: str, payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text ({err})") from None


def load_data(data_dir: str | os.PathLike, expected_cases: int | None = OFFICIAL_NUM_CASES) -> LongBenchChatData:
    """Read and check the three files in `data_dir`; DataError lists every problem."""
    data_dir = Path(data_dir)
    missing = [name for name in DATA_FILES if not (data_dir / name).is_file()]
    if missing:
        raise DataError(f"{data_dir}: missing {missing}; download them with "
                        f"`python LongBench_Chat/download.py --data_dir {data_dir}`, or put a copy of the "
                        "release there (see LongBench_Chat/README.md)")
    payloads = {name: (data_dir / name).read_bytes() for name in DATA_FILES}
    parsed, problems = check_texts({name: _decode(name, p) for name, p in payloads.items()}, expected_cases)
    if problems:
        raise DataError(_problem_report(data_dir, problems))
    return LongBenchChatData(parsed[TEST_CASES], parsed[FEW_SHOTS], parsed[TEMPLATE],
                             {name: hashlib.sha256(p).hexdigest() for name, p in payloads.items()})


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except OSError as err:
        raise DataError(f"could not download {url}: {err}") from err


def download(data_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL, overwrite: bool = False,
             expected_cases: int | None = OFFICIAL_NUM_CASES) -> dict:
    """Fetch the files from `base_url`, check them with the ones kept, and only then write them."""
    data_dir = Path(data_dir)
    todo = [name for name in DATA_FILES if overwrite or not (data_dir / name).is_file()]
    payloads = {name: _fetch(f"{base_url.rstrip('/')}/{name}") for name in todo}
    for name in DATA_FILES:
        if name not in payloads:
            payloads[name] = (data_dir / name).read_bytes()
    _, problems = check_texts({name: _decode(name, p) for name, p in payloads.items()}, expected_cases)
    if problems:
        raise DataError(_problem_report(f"{base_url} (nothing was written to {data_dir})", problems))
    for name in todo:
        write_bytes_atomic(data_dir / name, payloads[name])
    data = load_data(data_dir, expected_cases)
    return {"base_url": base_url, "downloaded": todo, "kept": [n for n in DATA_FILES if n not in todo],
            "cases": len(data.cases), "files": data.provenance()}
