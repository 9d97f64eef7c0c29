"""LongBench-Chat data: the three files of the official release, their download and schema check.

- `test_cases.json`: a list of `{"idx": int, "query": str, "prompt": str, "answer": str}`, where
  `prompt` is the long document followed by the question (what the model reads) and `query` the
  question alone (what the judge reads); idx are 1..N in order.
- `few_shots.json`: a list with one entry per case in idx order, each a list of 3
  `{"answer": str, "score": number}` — the judge's scored example answers.
- `prompt_fs.txt`: the judge's few-shot template, a `str.format` text with 9 `{}` slots:
  question, reference answer, (example answer, example score) x 3, the answer to rate.
"""
from __future__ import annotations

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
CASE_FIELDS = {"idx": int, "query": str, "prompt": str, "answer": str}
SHOTS_PER_CASE = 3
TEMPLATE_SLOTS = 3 + 2 * SHOTS_PER_CASE  # question, reference, 3 x (answer, score), prediction
DOWNLOAD_TIMEOUT_S = 60


class DataError(ValueError):
    """A LongBench-Chat data file is missing or does not have the expected schema."""


@dataclass
class LongBenchChatData:
    cases: list[dict]
    few_shots: list[list[dict]]
    template: str

    def shots_for(self, case: dict) -> list[dict]:
        return self.few_shots[case["idx"] - 1]


def load_data(data_dir: str | os.PathLike) -> LongBenchChatData:
    """Read and check the three files in `data_dir`; raise DataError naming the exact problem."""
    data_dir = Path(data_dir)
    missing = [name for name in DATA_FILES if not (data_dir / name).is_file()]
    if missing:
        raise DataError(f"{data_dir}: missing {missing}; download them with "
                        f"`python LongBench_Chat/download.py --data_dir {data_dir}` (see LongBench_Chat/README.md)")
    cases = _read_json(data_dir / TEST_CASES)
    few_shots = _read_json(data_dir / FEW_SHOTS)
    template = (data_dir / TEMPLATE).read_text(encoding="utf-8")
    check_cases(cases, data_dir / TEST_CASES)
    check_few_shots(few_shots, len(cases), data_dir / FEW_SHOTS)
    check_template(template, data_dir / TEMPLATE)
    return LongBenchChatData(cases, few_shots, template)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def check_cases(cases, where) -> None:
    if not isinstance(cases, list) or not cases:
        raise DataError(f"{where}: expected a non-empty JSON list of cases, got {type(cases).__name__}")
    for position, case in enumerate(cases):
        if not isinstance(case, dict):
            raise DataError(f"{where}: case #{position} is {type(case).__name__}, expected an object")
        for name, kind in CASE_FIELDS.items():
            if name not in case:
                raise DataError(f"{where}: case #{position} has no field {name!r} (fields: {sorted(case)})")
            if not isinstance(case[name], kind) or isinstance(case[name], bool):
                raise DataError(f"{where}: case #{position} field {name!r} is {type(case[name]).__name__}, "
                                f"expected {kind.__name__}")
        if case["idx"] != position + 1:
            raise DataError(f"{where}: case #{position} has idx {case['idx']}, expected {position + 1} "
                            f"(idx must be 1..N in order: few_shots.json is matched by position)")


def check_few_shots(few_shots, num_cases: int, where) -> None:
    if not isinstance(few_shots, list) or len(few_shots) != num_cases:
        got = len(few_shots) if isinstance(few_shots, list) else type(few_shots).__name__
        raise DataError(f"{where}: expected a list of {num_cases} entries (one per case), got {got}")
    for position, shots in enumerate(few_shots):
        if not isinstance(shots, list) or len(shots) != SHOTS_PER_CASE:
            raise DataError(f"{where}: entry #{position} (idx {position + 1}) must be a list of "
                            f"{SHOTS_PER_CASE} scored answers")
        for k, shot in enumerate(shots):
            if not isinstance(shot, dict) or not isinstance(shot.get("answer"), str):
                raise DataError(f"{where}: idx {position + 1} shot {k} needs a string 'answer'")
            score = shot.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float, str)) or not _is_number(score):
                raise DataError(f"{where}: idx {position + 1} shot {k} has score {score!r}, expected a number")


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def check_template(template: str, where) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise DataError(f"{where}: not a valid format template ({err})") from None
    if len(fields) != TEMPLATE_SLOTS or any(name != "" for name in fields):
        raise DataError(f"{where}: expected {TEMPLATE_SLOTS} positional '{{}}' slots, found {len(fields)} "
                        f"({fields!r})")


def download(data_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL, overwrite: bool = False) -> dict:
    """Fetch the three files from `base_url` into `data_dir` (atomically), then check them."""
    data_dir = Path(data_dir)
    report = {"base_url": base_url, "downloaded": [], "kept": []}
    todo = [name for name in DATA_FILES if overwrite or not (data_dir / name).is_file()]
    report["kept"] = [name for name in DATA_FILES if name not in todo]
    for name in todo:
        url = f"{base_url.rstrip('/')}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except OSError as err:
            raise DataError(f"could not download {url}: {err}") from err
        write_bytes_atomic(data_dir / name, payload)
        report["downloaded"].append(name)
    data = load_data(data_dir)
    report["cases"] = len(data.cases)
    return report
