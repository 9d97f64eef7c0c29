"""Pure packing / sorting functions: exact results on drawn examples plus invariants on random mixes."""
import numpy as np
import pytest

from longalign.data.packing import (attention_costs, balanced_group_order, best_fit_decreasing_pack, greedy_original_pack,
                               greedy_pack, group_imbalance, plan_packs, split_packs_to_fill_groups)
from longalign.data.sorting import fill_last_group, group_padding_fractions, original_sorted_group_order, sorted_group_order

MAX = 10
LENGTHS = [10, 3, 4, 5, 2, 8]  # one exactly MAX long


def test_greedy_walks_in_stored_order():
    assert greedy_pack(LENGTHS, MAX) == [[0], [1, 2], [3, 4], [5]]
    assert greedy_pack([6, 5, 4, 3, 2], MAX) == [[0], [1, 2], [3, 4]]  # docstring example


def test_best_fit_decreasing_exact_packs():
    # 10 -> A full; 8 -> B (2 free); 5 -> C (5 free); 4 -> C, the tightest fit (1 free);
    # 3 fits nowhere -> D (7 free); 2 -> B, tighter than D (0 free)
    assert best_fit_decreasing_pack(LENGTHS, MAX) == [[0], [5, 4], [3, 2], [1]]
    assert best_fit_decreasing_pack([6, 5, 4, 3, 2], MAX) == [[0, 2], [1, 3, 4]]


@pytest.mark.parametrize("pack", [greedy_pack, best_fit_decreasing_pack])
@pytest.mark.parametrize("bad_length", [0, MAX + 1])
def test_lengths_outside_range_are_rejected(pack, bad_length):
    with pytest.raises(ValueError, match="outside"):
        pack([3, bad_length], MAX)


@pytest.mark.parametrize("pack", [greedy_pack, best_fit_decreasing_pack])
def test_random_mix_every_sequence_once_and_packs_fit(pack):
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(800, 6401, 200), rng.integers(10, 401, 1200)])
    rng.shuffle(lengths)
    packs = pack(lengths, 6400)
    members = sorted(i for p in packs for i in p)
    assert members == list(range(len(lengths)))
    assert all(lengths[p].sum() <= 6400 for p in packs)
    efficiency = lengths.sum() / (len(packs) * 6400)
    if pack is best_fit_decreasing_pack:
        assert efficiency > 0.99
        assert len(packs) <= len(greedy_pack(lengths, 6400))


def test_split_packs_to_fill_groups():
    packs, splits = split_packs_to_fill_groups([[0, 1, 2], [3]], [2, 2, 2, 9], 3)
    assert (packs, splits) == ([[0], [1, 2], [3]], 1)  # tie of cuts: the first
    # no pack has two sequences: nothing to split, the caller repeats instead
    assert split_packs_to_fill_groups([[0], [1]], [9, 9], 3) == ([[0], [1]], 0)


def test_fill_last_group_repeats_its_own_members():
    order, repeated = fill_last_group(np.array([4, 3, 2, 1, 0]), 3)
    assert order.tolist() == [4, 3, 2, 1, 1, 0] and repeated == 1
    order, repeated = fill_last_group(np.array([7]), 4)
    assert order.tolist() == [7, 7, 7, 7] and repeated == 3
    order, repeated = fill_last_group(np.array([5, 6, 8, 9]), 6)  # 4 members, 2 missing
    assert order.tolist() == [5, 5, 6, 6, 8, 9] and repeated == 2
    order, repeated = fill_last_group(np.array([1, 2]), 2)
    assert order.tolist() == [1, 2] and repeated == 0


def test_balanced_group_order_groups_similar_costs_and_seed_shuffles():
    costs = np.array([9, 1, 8, 2, 5, 4, 7, 3])
    order, repeated = balanced_group_order(costs, 2, seed=0)
    assert repeated == 0 and sorted(order.tolist()) == list(range(8))
    groups = {tuple(sorted(g)) for g in order.reshape(-1, 2).tolist()}
    assert groups == {(0, 2), (4, 6), (5, 7), (1, 3)}  # cost pairs (9 8) (7 5) (4 3) (2 1)
    same, _ = balanced_group_order(costs, 2, seed=0)
    assert same.tolist() == order.tolist()
    orders = {tuple(balanced_group_order(costs, 2, seed=s)[0].tolist()) for s in range(6)}
    assert len(orders) > 1


def test_attention_cost_and_imbalance():
    assert attention_costs([[0, 1], [2]], [3, 4, 5]).tolist() == [25, 25]
    assert group_imbalance([4, 2, 3, 3], 2).tolist() == pytest.approx([4 / 3, 1.0])


def test_plan_packs_completes_groups_for_both_strategies():
    lengths = [4, 10, 10, 3, 6, 2]
    greedy, counts = plan_packs(lengths, MAX, "greedy", 2, seed=0)
    assert greedy == [[0], [1], [2], [3], [4], [5]]  # [3 4] was split to make 6 packs
    assert counts == {"packs_before_completing_groups": 5, "packs_split_to_complete_groups": 1,
                      "repeated_packs": 0}
    bfd, counts = plan_packs(lengths, MAX, "bfd", 2, seed=0)
    assert sorted(map(sorted, bfd)) == [[0, 4], [1], [2], [3, 5]] and counts["repeated_packs"] == 0
    single, counts = plan_packs([9, 9, 9], MAX, "bfd", 2, seed=0)  # nothing to split: repeat
    assert len(single) == 4 and counts["repeated_packs"] == 1
    with pytest.raises(ValueError, match="strategy"):
        plan_packs(lengths, MAX, "first_fit", 2, seed=0)


def test_sorted_group_order_sorted_complete_and_seeded():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 1000, 43)
    order, repeated = sorted_group_order(lengths, 4, seed=3)
    assert repeated == 1 and len(order) == 44
    counts = np.bincount(order, minlength=len(lengths))
    assert counts.min() == 1 and counts.sum() - len(lengths) == repeated  # all kept, one repeat
    groups = lengths[order].reshape(-1, 4)
    assert all((np.diff(g) <= 0).all() for g in groups)  # longest first inside a group
    # groups are consecutive runs of the length-sorted order: no group straddles another
    spans = sorted((g.min(), g.max()) for g in groups)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))
    assert sorted_group_order(lengths, 4, seed=3)[0].tolist() == order.tolist()
    assert sorted_group_order(lengths, 4, seed=4)[0].tolist() != order.tolist()
    with pytest.raises(ValueError, match="group_size"):
        sorted_group_order(lengths, 0, seed=3)


def test_group_padding_fractions():
    assert group_padding_fractions([4, 2, 3, 3], 2).tolist() == [0.25, 0.0]


# ---- the original code's rules (README differences table) ------------------------------------
def test_greedy_original_rules():
    packs, counts = greedy_original_pack([6, 5, 4, 3, 2, 10], MAX)  # docstring example
    assert packs == [[0], [1, 2]]
    assert counts == {"original_skipped_max_length_sequences": 1, "original_dropped_last_pack_sequences": 2,
                      "original_dropped_last_pack_tokens": 5}
    # >=: a pack never fills exactly (5 + 5 = MAX starts a new pack), unlike greedy's <=
    assert greedy_original_pack([5, 5, 1], MAX)[0] == [[0]] and greedy_pack([5, 5, 1], MAX) == [[0, 1], [2]]
    # a sequence of exactly max_length is skipped; greedy keeps it as its own pack
    assert greedy_original_pack([10, 3, 9, 1], MAX)[0] == [[1], [2]] and greedy_pack([10, 3, 9, 1], MAX)[0] == [0]
    assert greedy_original_pack([3, 4], MAX) == ([], {"original_skipped_max_length_sequences": 0,
                                                      "original_dropped_last_pack_sequences": 2,
                                                      "original_dropped_last_pack_tokens": 7})


def test_plan_packs_greedy_original_drops_the_incomplete_group_in_creation_order():
    lengths = [6, 5, 4, 7, 2, 9, 9, 3]  # [3] is the dropped last pack, [6] the incomplete group
    packs, counts = plan_packs(lengths, MAX, "greedy_original", 2, seed=0)
    created, _ = greedy_original_pack(lengths, MAX)
    assert created == [[0], [1, 2], [3, 4], [5], [6]] and packs == created[:4]
    assert counts["original_dropped_incomplete_group_packs"] == 1
    assert counts["original_dropped_incomplete_group_sequences"] == 1
    assert counts["repeated_packs"] == counts["packs_split_to_complete_groups"] == 0
    assert plan_packs(lengths, MAX, "greedy_original", 2, seed=5)[0] == packs  # no shuffle: stored order
    with pytest.raises(ValueError, match="not one whole group"):
        plan_packs([3, 4], MAX, "greedy_original", 1, seed=0)


def test_original_sorted_group_order_drops_the_longest_remainder():
    order, dropped = original_sorted_group_order(np.array([5, 1, 9, 3, 7]), 2, seed=0)
    assert dropped == 1 and sorted(map(sorted, order.reshape(-1, 2).tolist())) == [[0, 4], [1, 3]]
    assert 2 not in order  # the longest sequence is the remainder
    groups = np.array([[1, 3], [0, 4]])  # shortest first, then shuffled with the seed
    assert order.tolist() == groups[np.random.default_rng(0).permutation(2)].reshape(-1).tolist()
    ties, _ = original_sorted_group_order(np.array([2, 2, 1, 2]), 2, seed=0)
    assert sorted(ties.reshape(-1, 2).tolist()) == [[1, 3], [2, 0]]  # equal lengths keep stored order
    with pytest.raises(ValueError, match="do not fill one group"):
        original_sorted_group_order(np.array([1, 2]), 3, seed=0)
