"""Issue 15 item 7: a corrupt pack row is found before the first step, by its dataset row.

The pack dataset is built by sort_and_group's own code; each case corrupts one row (never row 0,
so a message naming the index inside a batch would be wrong) and checks the error names it.
train.py's use of the check is tested in test_faults_train.py."""
import copy

import datasets
import numpy as np
import pytest

from longalign.constants import IGNORE_INDEX as X
from longalign.data.validation import DatasetValidationError, validate_training_dataset
from sort_and_group import sort_and_group

VOCAB = 1000
BAD_ROW = 3


@pytest.fixture(scope="module")
def pack_rows(tmp_path_factory):
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for _ in range(40):
        length = int(rng.integers(4, 12))
        row = rng.integers(1, VOCAB, length).tolist()
        ids.append(row)
        labels.append([X] * (length // 2) + row[length // 2:])
    path = tmp_path_factory.mktemp("pack") / "data"
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(str(path))
    sort_and_group(path, 2, 32, "bfd", 0, "truncate")
    rows = datasets.load_from_disk(str(path / "pack")).to_list()
    assert len(rows) > BAD_ROW and all(len(r["cu_seqlens"]) > 2 for r in rows[BAD_ROW:BAD_ROW + 1])
    return rows


def corrupted(rows, change):
    rows = copy.deepcopy(rows)
    change(rows[BAD_ROW])
    return datasets.Dataset.from_list(rows)


def test_a_sound_pack_dataset_passes(pack_rows):
    checked = validate_training_dataset(datasets.Dataset.from_list(pack_rows), VOCAB, True, "pack")
    assert checked["rows"] == len(pack_rows) and checked["tokens"] == sum(len(r["input_ids"]) for r in pack_rows)


def _collapse(row):
    row["cu_seqlens"] = [0, len(row["input_ids"])]


def _set(key, value):
    return lambda row: row.__setitem__(key, value(row))


CORRUPTIONS = {
    "collapsed cu_seqlens": (_collapse, "num_sequences differs"),
    "cu_seqlens not ending at T": (_set("cu_seqlens", lambda r: r["cu_seqlens"][:-1] + [r["cu_seqlens"][-1] - 1]),
                                   "must end at the row's length"),
    "cu_seqlens not starting at 0": (_set("cu_seqlens", lambda r: [1] + r["cu_seqlens"][1:]), "must start at 0"),
    "cu_seqlens not increasing": (_set("cu_seqlens", lambda r: [0, r["cu_seqlens"][1], r["cu_seqlens"][1]]
                                       + r["cu_seqlens"][2:]), "strictly increasing"),
    "cu_seqlens too short": (_set("cu_seqlens", lambda r: [0]), "at least"),
    "labels shorter than ids": (_set("labels", lambda r: r["labels"][:-1]), "differ in length"),
    "token id >= vocab": (_set("input_ids", lambda r: r["input_ids"][:-1] + [VOCAB]), r"outside \[0, vocab size"),
    "negative token id": (_set("input_ids", lambda r: [-1] + r["input_ids"][1:]), r"outside \[0, vocab size"),
    "label id >= vocab": (_set("labels", lambda r: r["labels"][:-1] + [VOCAB + 5]), "labels neither"),
    "num_sequences off by one": (_set("num_sequences", lambda r: r["num_sequences"] + 1), "num_sequences differs"),
    "weight on a prompt token": (_set("loss_weights", lambda r: [0.5] + r["loss_weights"][1:]), "loss_weights are not"),
    "weights not 1/N_k": (_set("loss_weights", lambda r: [w * 2 for w in r["loss_weights"]]), "loss_weights are not"),
    "NaN weight": (_set("loss_weights", lambda r: r["loss_weights"][:-1] + [float("nan")]), "loss_weights are not"),
    "weights shorter than labels": (_set("loss_weights", lambda r: r["loss_weights"][:-1]), "loss_weights and labels"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_row_is_named_by_its_dataset_row(pack_rows, name):
    change, message = CORRUPTIONS[name]
    with pytest.raises(DatasetValidationError, match=rf"pack: row {BAD_ROW}: .*{message}"):
        validate_training_dataset(corrupted(pack_rows, change), VOCAB, True, "pack")


def test_rows_longer_than_max_length_and_empty_rows_are_refused(pack_rows):
    longest = max(len(r["input_ids"]) for r in pack_rows)
    with pytest.raises(DatasetValidationError, match="longer than max_length"):
        validate_training_dataset(datasets.Dataset.from_list(pack_rows), VOCAB, True, "pack", max_length=longest - 1)
    plain = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in pack_rows]
    plain[BAD_ROW] = {"input_ids": [], "labels": []}
    with pytest.raises(DatasetValidationError, match=f"row {BAD_ROW}: the row has no tokens"):
        validate_training_dataset(datasets.Dataset.from_list(plain), VOCAB, False, "sort")


def test_rows_past_the_first_slice_are_named_by_their_dataset_row(pack_rows, monkeypatch):
    from longalign.data import validation

    monkeypatch.setattr(validation, "ROWS_PER_SLICE", 2)  # BAD_ROW sits in the second slice
    with pytest.raises(DatasetValidationError, match=f"row {BAD_ROW}: .*outside"):
        validate_training_dataset(corrupted(pack_rows, CORRUPTIONS["token id >= vocab"][0]), VOCAB, True, "pack")
    validate_training_dataset(datasets.Dataset.from_list(pack_rows), VOCAB, True, "pack")


def test_missing_columns_and_an_empty_dataset_are_refused(pack_rows):
    with pytest.raises(DatasetValidationError, match=r"missing column\(s\) \['cu_seqlens'\]"):
        validate_training_dataset(datasets.Dataset.from_list(pack_rows).remove_columns("cu_seqlens"), VOCAB, True, "p")
    with pytest.raises(DatasetValidationError, match="no rows"):
        validate_training_dataset(datasets.Dataset.from_list(pack_rows).select([]), VOCAB, True, "p")


def test_a_dataset_without_any_target_is_refused_naming_it(pack_rows):
    checked = validate_training_dataset(datasets.Dataset.from_list(pack_rows), VOCAB, True, "pack")
    assert checked["targets"] > 0
    plain = [{"input_ids": r["input_ids"], "labels": [X] * len(r["labels"])} for r in pack_rows]
    with pytest.raises(DatasetValidationError, match=r"data/sort: no row has a target token"):
        validate_training_dataset(datasets.Dataset.from_list(plain), VOCAB, False, "data/sort")
    # labels only on each sequence's first token: the model never predicts them, so no target either
    firsts = [{**r, "labels": [r["input_ids"][i] if i in r["cu_seqlens"][:-1] else X for i in range(len(r["labels"]))],
               "loss_weights": [0.0] * len(r["labels"]), "num_sequences": 0} for r in pack_rows]
    with pytest.raises(DatasetValidationError, match=r"data/pack: no row has a target token"):
        validate_training_dataset(datasets.Dataset.from_list(firsts), VOCAB, True, "data/pack")
