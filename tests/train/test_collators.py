"""Collators: batch layout (DESIGN.md §3), loss weights per reduction, counts, bad input."""
import pytest
import torch

from longalign.train.collators import (COUNT_FIELDS, COUNTS_KEY, ROW_INDEX_KEY, OriginalWarmup, PackCollator,
                                 PaddedCollator, build_collator, pack_weights_and_counts)
from longalign.constants import IGNORE_INDEX as X


def counts_of(batch):
    return dict(zip(COUNT_FIELDS, batch[COUNTS_KEY].tolist()))


PACK_A = {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "cu_seqlens": [0, 3, 5]}
PACK_B = {"input_ids": [6, 7, 8, 9], "labels": [6, X, X, 9], "cu_seqlens": [0, 2, 4]}


def test_pack_weights_per_reduction():
    labels, cu = torch.tensor([X, 5, 6, X, 7]), torch.tensor([0, 3, 5])
    expected = {"sequence": [0, .5, .5, 0, 1], "pack_mean": [0, 1 / 3, 1 / 3, 0, 1 / 3], "token": [0, 1, 1, 0, 1]}
    for reduction, want in expected.items():
        weights, counts = pack_weights_and_counts(labels, cu, reduction)
        assert torch.allclose(weights, torch.tensor(want, dtype=torch.float32)), reduction
        assert counts.tolist() == [2, 1, 3, 5, 9 + 4]


def test_first_token_of_a_sequence_is_never_a_target():
    # label 7 sits on the first token of sequence 2: it has no previous token to predict it
    weights, counts = pack_weights_and_counts(torch.tensor([X, 5, 7, X]), torch.tensor([0, 2, 4]), "sequence")
    assert weights.tolist() == [0, 1, 0, 0]
    assert counts.tolist()[:3] == [1, 1, 1]


def test_single_pack_batch_layout():
    batch = PackCollator("sequence")([PACK_A])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 5)
    assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].shape == (1, 5)
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5] and batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["loss_weights"].tolist() == [[0, .5, .5, 0, 1]]


def test_two_packs_concatenate_with_per_pack_means():
    batch = PackCollator("pack_mean")([PACK_A, PACK_B])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 9] and batch["max_length_q"] == 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1]]
    # pack A has 3 targets, pack B one (9); 6 and the label on token 8's successor are not targets
    assert torch.allclose(batch["loss_weights"][0], torch.tensor([0, 1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0, 1]))
    assert counts_of(batch) == {"sequences": 3, "packs": 2, "target_tokens": 4, "tokens": 9,
                                "sum_sq_lengths": 9 + 4 + 4 + 4}


def test_padded_batch_right_padding_and_weights():
    rows = [{"input_ids": [1, 2, 3], "labels": [X, 2, 3]}, {"input_ids": [4, 5], "labels": [X, X]}]
    batch = PaddedCollator("sequence", pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_weights"].tolist() == [[0, .5, .5], [0, 0, 0]]
    assert counts_of(batch) == {"sequences": 1, "packs": 1, "target_tokens": 2, "tokens": 5, "sum_sq_lengths": 13}
    token = PaddedCollator("token", pad_token_id=0)(rows)
    assert token["loss_weights"].tolist() == [[0, 1, 1], [0, 0, 0]]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="cu_seqlens"):
        PackCollator("sequence")([{**PACK_A, "cu_seqlens": [0, 3, 4]}])
    with pytest.raises(ValueError, match="strictly increasing"):
        PackCollator("sequence")([{**PACK_A, "cu_seqlens": [0, 3, 3, 5]}])
    with pytest.raises(KeyError, match="cu_seqlens"):
        PackCollator("sequence")([{"input_ids": [1, 2], "labels": [X, 2]}])
    with pytest.raises(ValueError, match="labels"):
        PaddedCollator("sequence", 0)([{"input_ids": [1, 2], "labels": [X]}])
    with pytest.raises(KeyError, match="labels"):
        PaddedCollator("sequence", 0)([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="reduction"):
        PackCollator("mean")
    with pytest.raises(ValueError, match="pad token"):
        build_collator("sort", "sequence", None)
    with pytest.raises(ValueError, match="batch_method"):
        build_collator("bucket", "sequence", 0)


def test_pack_weights_do_not_depend_on_the_cuda_device_count(monkeypatch):
    """README differences, "K from the GPU count": the original scaled every weight by
    torch.cuda.device_count() / K (0 on a CPU machine: all weights 0). Ours are 1/N_k and the
    counts give K, whatever the device count says."""
    batches = []
    for count in (0, 1, 8):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        batches.append(PackCollator("sequence")([PACK_A, PACK_B]))
    for batch in batches[1:]:
        assert torch.equal(batch["loss_weights"], batches[0]["loss_weights"])
        assert torch.equal(batch[COUNTS_KEY], batches[0][COUNTS_KEY])
    weights = batches[0]["loss_weights"][0]
    assert torch.allclose(weights, torch.tensor([0, .5, .5, 0, 1, 0, 0, 0, 1]))  # 1/N_k, sums 1 per sequence
    assert counts_of(batches[0])["sequences"] == 3  # K: sequences with targets


def test_original_warmup_packs_cut_and_double():
    """README differences, "warm-up packs": the original's dataset.py cuts the packs at index < 32
    to 32,768 tokens and doubles their weights, K counting the uncut packs."""
    assert (OriginalWarmup().packs, OriginalWarmup().tokens, OriginalWarmup().weight_scale) == (32, 32768, 2.0)
    warmup = OriginalWarmup(packs=1, tokens=4)  # PACK_A: labels [X 2 3 | X 5], cu [0 3 5]
    rows = [{**PACK_A, ROW_INDEX_KEY: 0}, {**PACK_A, ROW_INDEX_KEY: 1}]
    batch = PackCollator("sequence", warmup)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 3, 4, 5]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 7, 9]  # the second sequence cut to its head
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 0, 1]]
    assert batch["loss_weights"].tolist() == [[0, 1, 1, 0, 0, .5, .5, 0, 1]]  # full 1/N_k, doubled
    assert counts_of(batch) == {"sequences": 4, "packs": 2, "target_tokens": 6,  # the uncut packs'
                                "tokens": 9, "sum_sq_lengths": 9 + 1 + 9 + 4}  # the work done
    mean = PackCollator("pack_mean", warmup)(rows)  # without --pack_loss: the cut pack's token mean
    assert torch.allclose(mean["loss_weights"][0, :4], torch.tensor([0, .5, .5, 0]))
    assert counts_of(mean)["packs"] == 2 and counts_of(mean)["target_tokens"] == 2 + 3
    with pytest.raises(KeyError, match=ROW_INDEX_KEY):
        PackCollator("sequence", warmup)([PACK_A])
    with pytest.raises(ValueError, match="warm-up"):
        PackCollator("token", warmup)
    with pytest.raises(ValueError, match="--batch_method pack"):
        build_collator("sort", "sequence", 0, original_warmup=True)


def test_pack_collator_reads_the_stored_loss_weights_for_the_sequence_reduction():
    stored = {**PACK_A, "loss_weights": [0, .25, .75, 0, 1]}  # not the 1/N_k the labels give
    assert PackCollator("sequence")([stored])["loss_weights"].tolist() == [[0, .25, .75, 0, 1]]
    warm = PackCollator("sequence", OriginalWarmup(packs=1, tokens=4))([{**stored, ROW_INDEX_KEY: 0}])
    assert warm["loss_weights"].tolist() == [[0, .5, 1.5, 0]]  # the original: stored weights, cut, doubled
    mean = PackCollator("pack_mean")([stored])  # the other reductions are derived from the labels
    assert torch.allclose(mean["loss_weights"][0], torch.tensor([0, 1 / 3, 1 / 3, 0, 1 / 3]))
    with pytest.raises(ValueError, match="loss_weights: expected 5 values"):
        PackCollator("sequence")([{**PACK_A, "loss_weights": [0, .5, .5, 0]}])
