"""The training datasets of train.py: the tokenized dataset (naive) or its sort/ and pack/ (DESIGN.md §1-2)."""
from __future__ import annotations

from pathlib import Path

import datasets

from longalign.constants import TOKEN_COLUMNS
from longalign.train.parallel_layout import read_layout_stats


def load_train_dataset(train_file: str, batch_method: str):
    """(dataset, group_size) for the method; group_size from <dir>/stats.json (None for naive)."""
    directory = Path(train_file) if batch_method == "naive" else Path(train_file) / batch_method
    if not directory.is_dir():
        hint = "run pre_tokenize.py" if batch_method == "naive" else f"run sort_and_group.py --train_file {train_file}"
        raise FileNotFoundError(f"{directory}: no dataset for --batch_method {batch_method} ({hint})")
    dataset = datasets.load_from_disk(str(directory))
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{directory}: expected one Dataset, found {type(dataset).__name__}")
    needed = set(TOKEN_COLUMNS) | ({"cu_seqlens"} if batch_method == "pack" else set())
    if needed - set(dataset.column_names):
        raise ValueError(f"{directory}: missing columns {sorted(needed - set(dataset.column_names))} (DESIGN.md §1-2)")
    if batch_method == "naive":
        return dataset, None
    stats_file = directory / "stats.json"
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file}: missing; the group size of the stored order is read from it")
    return dataset, read_layout_stats(stats_file)["group_size"]
