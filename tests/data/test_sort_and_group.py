"""sort_and_group end to end on hand-written datasets: exact packs, weights, conservation, errors."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from longalign.constants import IGNORE_INDEX
from sort_and_group import main, sort_and_group

REPO = Path(__file__).resolve().parents[2]
MAX = 10
X = IGNORE_INDEX
# Sequence k has token ids 100k + j, so every token says where it came from.
LABEL_MASKS = [  # 1 = target
    [0, 1, 1, 1],                              # s0: 4 tokens, 3 targets
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],            # s1: exactly MAX long
    [0] * 8 + [1, 1, 1, 1],                    # s2: MAX + 2 long; 2 targets survive truncation
    [0, 0, 0],                                 # s3: no targets
    [1, 1, 1, 1, 1, 1],                        # s4
    [0, 1],                                    # s5
]


def make_sequences(masks=LABEL_MASKS):
    ids = [[100 * k + j for j in range(len(mask))] for k, mask in enumerate(masks)]
    labels = [[t if m else X for t, m in zip(row, mask)] for row, mask in zip(ids, masks)]
    return ids, labels


def save_dataset(path, ids, labels, dtype="int32", extra=None):
    feature = datasets.List(datasets.Value(dtype))
    columns = {"input_ids": ids, "labels": labels, **(extra or {})}
    features = datasets.Features({"input_ids": feature, "labels": feature,
                                  **{k: datasets.Value("string") for k in (extra or {})}})
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return path


@pytest.fixture
def train_file(tmp_path):
    return save_dataset(tmp_path / "10k", *make_sequences())


def run(train_file, group_size=1, strategy="bfd", seed=0, too_long="truncate"):
    summary = sort_and_group(train_file, group_size, MAX, strategy, seed, too_long)
    return (summary, datasets.load_from_disk(str(train_file / "sort")),
            datasets.load_from_disk(str(train_file / "pack")))


def pack_members(pack_rows):
    """Each pack as the list of source sequence ids (token // 100) of its segments."""
    return [[row["input_ids"][a] // 100 for a in row["cu_seqlens"][:-1]] for row in pack_rows]


def segments(pack_rows):
    """Every packed sequence as (input_ids, labels, loss_weights) tuples cut by cu_seqlens."""
    for row in pack_rows:
        cu = row["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            yield row["input_ids"][a:b], row["labels"][a:b], row["loss_weights"][a:b]


def expected_sequences(too_long):
    ids, labels = make_sequences()
    if too_long == "skip":
        return [(i, l) for i, l in zip(ids, labels) if len(i) <= MAX]
    return [(i[:MAX], l[:MAX]) for i, l in zip(ids, labels)]


@pytest.mark.parametrize("too_long, greedy, bfd", [
    ("truncate", [[0], [1], [2], [3, 4], [5]], [[1], [2], [4, 0], [3, 5]]),
    ("skip", [[0], [1], [3, 4], [5]], [[1], [4, 0], [3, 5]]),
])
def test_exact_packs_for_both_strategies(train_file, too_long, greedy, bfd):
    _, _, packed = run(train_file, strategy="greedy", too_long=too_long)
    assert pack_members(packed) == greedy  # the paper's order of creation
    summary, _, packed = run(train_file, strategy="bfd", too_long=too_long)
    assert sorted(pack_members(packed)) == sorted(bfd)  # bfd packs, groups shuffled
    stats = json.loads((train_file / "pack" / "stats.json").read_text())
    assert stats == summary["pack"]
    assert stats["too_long"] == 1 and stats[f"too_long_{'truncated' if too_long == 'truncate' else 'skipped'}"] == 1
    assert stats["sequences_without_targets"] == 1
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (len(bfd) * MAX))


def test_too_long_error_raises_and_writes_nothing(train_file):
    with pytest.raises(ValueError, match="longer than --max_length"):
        run(train_file, too_long="error")
    assert not (train_file / "sort").exists() and not (train_file / "pack").exists()


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
@pytest.mark.parametrize("too_long", ["truncate", "skip"])
def test_weights_cu_seqlens_and_conservation(train_file, strategy, too_long):
    _, sort_rows, packed = run(train_file, group_size=2, strategy=strategy, too_long=too_long)
    assert packed.features["loss_weights"].feature.dtype == "float32"
    assert packed.features["cu_seqlens"].feature.dtype == "int32"
    assert len(packed) % 2 == 0
    for row in packed:
        cu = row["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == len(row["input_ids"]) == len(row["labels"]) <= MAX
        assert all(b > a for a, b in zip(cu, cu[1:]))
        assert len(row["loss_weights"]) == len(row["labels"])
        with_targets = [any(l != X for l in row["labels"][a:b]) for a, b in zip(cu, cu[1:])]
        assert row["num_sequences"] == sum(with_targets)
    for ids, labels, weights in segments(packed):
        weights = np.asarray(weights)
        assert (weights[np.asarray(labels) == X] == 0).all()
        expected_total = 1.0 if any(l != X for l in labels) else 0.0  # no targets: zero weight
        assert weights.sum() == pytest.approx(expected_total, abs=1e-6)
    expected = Counter((tuple(i), tuple(l)) for i, l in expected_sequences(too_long))
    packed_out = Counter((tuple(i), tuple(l)) for i, l, _ in segments(packed))
    assert packed_out == expected  # every sequence in exactly one pack
    sorted_out = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in sort_rows)
    assert set(sorted_out) == set(expected) and sum(sorted_out.values()) % 2 == 0


def test_sorted_groups_sorted_complete_and_remainder_counted(train_file):
    summary, sort_rows, _ = run(train_file, group_size=4, too_long="skip")  # 5 sequences
    lengths = [len(r["input_ids"]) for r in sort_rows]
    assert len(lengths) == 8 and summary["sort"]["repeated_rows_to_complete_last_group"] == 3
    groups = [lengths[i:i + 4] for i in range(0, 8, 4)]
    assert all(g == sorted(g, reverse=True) for g in groups)
    assert sorted(groups) == [[2, 2, 2, 2], [10, 6, 4, 3]]  # the remainder (s5) repeats itself
    stats = json.loads((train_file / "sort" / "stats.json").read_text())
    assert stats["groups"] == 2 and stats["padding_fraction_worst"] == pytest.approx(1 - 23 / 40)


def test_seed_fixes_output_and_changes_group_order(tmp_path):
    rng = np.random.default_rng(0)
    masks = [[1] * int(n) for n in rng.integers(1, MAX + 1, 40)]
    path = save_dataset(tmp_path / "d", *make_sequences(masks))
    _, sort_a, pack_a = run(path, group_size=2, seed=1)
    sort_a, pack_a = sort_a.to_dict(), pack_a.to_dict()
    _, sort_b, pack_b = run(path, group_size=2, seed=1)
    assert sort_b.to_dict() == sort_a and pack_b.to_dict() == pack_a
    _, sort_c, pack_c = run(path, group_size=2, seed=2)
    assert sort_c.to_dict() != sort_a and pack_c.to_dict() != pack_a
    assert Counter(map(tuple, sort_c["input_ids"])) == Counter(map(tuple, sort_a["input_ids"]))


def test_int64_input_is_written_as_int32_and_extra_columns_ignored(tmp_path):
    ids, labels = make_sequences()
    path = save_dataset(tmp_path / "d", ids, labels, dtype="int64", extra={"source": ["x"] * 6})
    summary, sort_rows, packed = run(path)
    assert sort_rows.features["input_ids"].feature.dtype == "int32"
    assert packed.features["labels"].feature.dtype == "int32"
    assert summary["pack"]["ignored_columns"] == ["source"]


def test_empty_sequence_is_skipped_and_counted(tmp_path):
    path = save_dataset(tmp_path / "d", [[1, 2], []], [[X, 2], []])
    summary, sort_rows, _ = run(path)
    assert summary["sort"]["empty_skipped"] == 1 and len(sort_rows) == 1


@pytest.mark.parametrize("setup, error", [
    (lambda p: p / "missing", FileNotFoundError),
    (lambda p: save_dataset(p / "d", [[1]], [[1]]) and p / "d" / "nope", FileNotFoundError),
    (lambda p: (datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(p / "d")), p / "d")[1],
     ValueError),
    (lambda p: save_dataset(p / "d", [[1, 2]], [[1]]), ValueError),  # misaligned labels
])
def test_bad_input_raises_and_writes_nothing(tmp_path, setup, error):
    path = setup(tmp_path)
    with pytest.raises(error):
        run(path)
    assert not (path / "sort").exists() and not (path / "pack").exists()


@pytest.mark.parametrize("group_size", [0, -3])
def test_bad_group_size_writes_nothing(train_file, group_size):
    with pytest.raises(ValueError, match="group_size"):
        run(train_file, group_size=group_size)
    assert sorted(p.name for p in train_file.iterdir() if p.is_dir()) == []


def test_cli(train_file, capsys):
    """The command line through the script's main, in this process (the exit code: the next test)."""
    command = ["--train_file", str(train_file), "--group_size", "2", "--max_length", str(MAX),
               "--pack_strategy", "greedy"]
    main(command)
    stdout = capsys.readouterr().out
    assert "packing_efficiency" in stdout and "padding_fraction_mean" in stdout
    stats = json.loads((train_file / "pack" / "stats.json").read_text())
    assert stats["pack_strategy"] == "greedy" and stats["packs"] == 6
    assert datasets.load_from_disk(str(train_file / "sort")).num_rows == 6
    missing = train_file.parent / "nothing"
    with pytest.raises(FileNotFoundError, match="no such dataset directory"):
        main(["--train_file", str(missing)])
    assert not missing.exists()
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        main(command + ["--group_size", "0"])


@pytest.mark.subprocess
def test_cli_exit_code_names_the_missing_dataset(train_file):
    """`python sort_and_group.py` as a command: an error is a nonzero exit, its message on stderr."""
    missing = train_file.parent / "nothing"
    failed = subprocess.run([sys.executable, "sort_and_group.py", "--train_file", str(missing)],
                            cwd=REPO, capture_output=True, text=True)
    assert failed.returncode != 0 and "no such dataset directory" in failed.stderr
    assert not missing.exists()


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
def test_stored_weights_match_the_trainers_targets(train_file, strategy):
    """The stored 1/N_k weights sit exactly on the positions the shifted loss predicts: the
    collator's recomputation (what training uses) gives the same column, and a sequence's first
    token (s4 labels it) has weight 0."""
    import torch

    from longalign.train.collators import pack_weights_and_counts

    _, _, pack = run(train_file, strategy=strategy)
    for row in pack:
        labels = torch.tensor(row["labels"])
        cu = torch.tensor(row["cu_seqlens"])
        expected, _ = pack_weights_and_counts(labels, cu, "sequence")
        assert torch.equal(torch.tensor(row["loss_weights"], dtype=torch.float32), expected)
        assert all(row["loss_weights"][start] == 0.0 for start in row["cu_seqlens"][:-1])


# ---- the original code's batches (README differences table) ----------------------------------
ORIGINAL_PAD_ID = 0  # the original pads rows with id 0 and reads a row's length as argmin - 1 + 1


def padded_rows(ids, labels, max_length):
    """The original pre_tokenize.py's layout: rows right-truncated / padded to max_length."""
    inputs = np.full((len(ids), max_length), ORIGINAL_PAD_ID, dtype=np.int64)
    targets = np.full((len(ids), max_length), X, dtype=np.int64)
    for row, (a, b) in enumerate(zip(ids, labels)):
        inputs[row, :min(len(a), max_length)] = a[:max_length]
        targets[row, :min(len(b), max_length)] = b[:max_length]
    return inputs, targets


def original_packs_reference(inputs, labels, max_length, num_gpus):
    """The original sort_and_group.py pack loop and LMPackDataset's cut to whole GPU groups,
    written from its rules on padded rows: (input, label, weight, attention_mask) per pack, and
    `nums` (sequences with targets per group of num_gpus packs)."""
    def fresh():
        return (np.full(max_length, ORIGINAL_PAD_ID), np.full(max_length, X),
                np.zeros(max_length, dtype=np.float32), [0], 0)

    packs, (pack_in, pack_label, pack_weight, mask, used) = [], fresh()
    index = 0
    while index < len(inputs):
        eos = int(inputs[index].argmin()) - 1
        if eos + 1 >= max_length or eos < 0:  # a row without padding, or an empty one
            index += 1
        elif used + eos + 1 >= max_length:  # full: close the pack, the row goes to the next one
            packs.append((pack_in, pack_label, pack_weight, mask + [max_length]))
            pack_in, pack_label, pack_weight, mask, used = fresh()
        else:
            length = eos + 1
            pack_in[used:used + length] = inputs[index, :length]
            pack_label[used:used + length] = labels[index, :length]
            weight = (labels[index, :length] != X).astype(np.float32)
            if weight.sum() > 0.5:
                weight = weight / weight.sum()
            pack_weight[used:used + length] = weight
            used += length
            mask.append(used)
            index += 1
    kept = len(packs) // num_gpus * num_gpus  # the last partial pack was never appended
    packs = packs[:kept]
    nums = [sum(p[2].sum() for p in packs[g * num_gpus:(g + 1) * num_gpus]) for g in range(kept // num_gpus)]
    return packs, nums


def random_dataset(path, rng, count, max_length, with_full_rows=True):
    """Sequences like pre_tokenize's (first label never a target; ids >= 1), lengths 1..max+3."""
    masks = []
    for _ in range(count):
        length = int(rng.integers(1, max_length + 4 if with_full_rows else max_length))
        mask = (rng.random(length) < 0.6).astype(int) if rng.random() > 0.1 else np.zeros(length, int)
        mask[0] = 0
        masks.append(mask.tolist())
    ids, labels = make_sequences(masks)
    ids = [[token + 1 for token in row] for row in ids]  # no id 0: the original's pad
    labels = [[X if label == X else label + 1 for label in row] for row in labels]
    return save_dataset(path, ids, labels), ids, labels


@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_original_equals_the_originals_packs_weights_and_order(tmp_path, group_size):
    max_length = 24
    path, ids, labels = random_dataset(tmp_path / "d", np.random.default_rng(group_size), 60, max_length)
    summary = sort_and_group(path, group_size, max_length, "greedy_original", 0, "truncate")
    packed = datasets.load_from_disk(str(path / "pack"))
    reference, nums = original_packs_reference(*padded_rows(ids, labels, max_length), max_length, group_size)
    assert len(packed) == len(reference) > 2 * group_size
    for row, (ref_in, ref_label, ref_weight, ref_mask) in zip(packed, reference):
        length = len(row["input_ids"])
        assert row["input_ids"] == ref_in[:length].tolist() and (ref_in[length:] == ORIGINAL_PAD_ID).all()
        assert row["labels"] == ref_label[:length].tolist()
        assert row["loss_weights"] == ref_weight[:length].tolist() and not ref_weight[length:].any()
        assert row["cu_seqlens"] == ref_mask[:-1] and ref_mask[-1] == max_length
    per_group = np.add.reduceat([row["num_sequences"] for row in packed], np.arange(0, len(packed), group_size))
    assert per_group.tolist() == pytest.approx(nums)
    lengths = [min(len(row), max_length) for row in ids]
    stats = summary["pack"]
    assert stats["original_skipped_max_length_sequences"] == sum(length == max_length for length in lengths)
    placed = sum(len(row["cu_seqlens"]) - 1 for row in packed)
    dropped = (stats["original_dropped_last_pack_sequences"] + stats["original_dropped_incomplete_group_sequences"])
    assert placed + dropped + stats["original_skipped_max_length_sequences"] == len(ids)


def test_sort_remainder_drop_equals_the_originals_groups(tmp_path):
    max_length, group_size, seed = 64, 4, 3
    rng = np.random.default_rng(7)
    masks = [[0] + [1] * int(n - 1) for n in rng.permutation(np.arange(1, 40))[:30]]  # distinct lengths
    ids, labels = make_sequences(masks)
    ids = [[token + 1 for token in row] for row in ids]
    path = save_dataset(tmp_path / "d", ids, [[X] + row[1:] for row in ids])
    summary = sort_and_group(path, group_size, max_length, "bfd", seed, "truncate", sort_remainder="drop")
    rows = datasets.load_from_disk(str(path / "sort"))["input_ids"]
    inputs, _ = padded_rows(ids, ids, max_length)
    # the original: length = argmin - 1 (+1), ascending sort, the remainder cut off, groups permuted
    by_length = np.argsort(inputs.argmin(axis=1) - 1, kind="stable")
    kept = len(ids) // group_size * group_size
    groups = by_length[:kept].reshape(-1, group_size)
    permutation = np.random.default_rng(seed).permutation(len(groups))  # the original: torch.randperm
    assert rows == [ids[i] for i in groups[permutation].reshape(-1)]
    assert summary["sort"]["dropped_rows_incomplete_last_group"] == len(ids) - kept == 2
    assert summary["sort"]["repeated_rows_to_complete_last_group"] == 0
    assert {len(ids[i]) for i in by_length[kept:]} == {max(map(len, ids)), sorted(map(len, ids))[-2]}


def test_cli_original_flags(train_file):
    main(["--train_file", str(train_file), "--group_size", "1", "--max_length", str(MAX),
          "--pack_strategy", "greedy_original", "--sort_remainder", "drop"])
    pack = json.loads((train_file / "pack" / "stats.json").read_text())
    sort = json.loads((train_file / "sort" / "stats.json").read_text())
    # lengths after truncation [4 10 10 3 6 2]: both 10s skipped; packs [0 3] and [4 5], the last dropped
    assert (pack["pack_strategy"], pack["packs"], pack["original_skipped_max_length_sequences"]) == (
        "greedy_original", 1, 2)
    assert pack["original_dropped_last_pack_sequences"] == 2
    assert (sort["sort_remainder"], sort["rows"], sort["dropped_rows_incomplete_last_group"]) == ("drop", 6, 0)


# ---- refusals: no target left, an output given as input ------------------------------------------------
def test_no_target_left_after_truncation_is_an_error_and_writes_nothing(train_file):
    with pytest.raises(ValueError, match=rf"--train_file {train_file}: none of the 6 sequences keeps a target "
                                         r"token with --max_length 1 \(6 lost all their targets"):
        sort_and_group(train_file, 1, 1, "bfd", 0, "truncate")
    assert not (train_file / "sort").exists() and not (train_file / "pack").exists()


def test_sequences_without_targets_are_kept_counted_and_warned(train_file, capsys):
    import sort_and_group as script

    script.main(["--train_file", str(train_file), "--group_size", "1", "--max_length", "3"])
    stats = json.loads((train_file / "pack" / "stats.json").read_text())
    assert stats["sequences"] == 6 and stats["sequences_without_targets"] == 3  # s1, s2 truncated; s3 had none
    assert "warning: 3 of 6 sequences have no target token (2 lost all to truncation at --max_length 3)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("output", ["sort", "pack"])
def test_a_sort_or_pack_output_given_as_input_is_refused_naming_the_folder(train_file, output):
    run(train_file)
    nested = train_file / output
    with pytest.raises(ValueError, match=rf"--train_file {nested} is a sort_and_group output \(.*"
                                         r"\.longalign_output\.json names sort_and_group"):
        run(nested)
    assert not (nested / "sort").exists() and not (nested / "pack").exists()


def test_packs_or_a_sort_stats_json_without_the_marker_are_refused_too(train_file, tmp_path):
    run(train_file)
    packs = tmp_path / "packs"  # rows with cu_seqlens, written by hand (no marker, no stats.json)
    datasets.load_from_disk(str(train_file / "pack")).save_to_disk(str(packs))
    with pytest.raises(ValueError, match=r"is a sort_and_group output \(its rows carry cu_seqlens"):
        run(packs)
    older = tmp_path / "older_sort"  # a sort output of a version that wrote no marker
    datasets.load_from_disk(str(train_file / "sort")).save_to_disk(str(older))
    (older / "stats.json").write_text((train_file / "sort" / "stats.json").read_text())
    with pytest.raises(ValueError, match=r"is a sort_and_group output \(its stats.json has the pair_id"):
        run(older)
    assert not any((folder / name).exists() for folder in (packs, older) for name in ("sort", "pack"))
