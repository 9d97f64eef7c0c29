"""Pack geometry, the one owner of targets, 1/N_k, positions, cu_seqlens and the longest sequence:
the module docstring's drawn example, computed the same from numpy arrays and torch tensors."""
import numpy as np
import torch

from longalign.constants import IGNORE_INDEX as X
from longalign.pack_geometry import (cu_seqlens_values, longest_sequence, positions_from_cu_seqlens, segment_ids,
                                     sequence_loss_weights, sequence_starts, sequence_token_weights, target_mask,
                                     targets_per_sequence)

LABELS = [X, 5, 6, 7, 8, X, X, 9, 4]
CU = [0, 3, 5, 9]


def test_drawn_example_numpy_and_torch_agree():
    for labels, cu in ((np.array(LABELS), np.array(CU)), (torch.tensor(LABELS), torch.tensor(CU))):
        mask = target_mask(labels, sequence_starts(cu))
        assert mask.tolist() == [False, True, True, False, True, False, False, True, True]
        assert targets_per_sequence(mask, cu).tolist() == [2, 1, 2]
        assert sequence_token_weights(labels, cu).tolist() == [0, .5, .5, 0, 1, 0, 0, .5, .5]
        assert sequence_token_weights(labels, cu).dtype in (np.float32, torch.float32)
        assert longest_sequence(cu) == 4
    assert positions_from_cu_seqlens(torch.tensor(CU), 9).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert segment_ids(torch.tensor([0, 2, 5])).tolist() == [0, 0, 1, 1, 1]


def test_a_sequences_first_label_is_never_a_target():
    labels = np.array([1, 2, 3, 4])
    assert target_mask(labels, np.array([0, 2])).tolist() == [False, True, False, True]
    assert labels.tolist() == [1, 2, 3, 4]  # the input is not modified


def test_loss_weights_and_cu_seqlens():
    assert sequence_loss_weights(np.array([4, 0, 1])).tolist() == [0.25, 0.0, 1.0]
    assert sequence_loss_weights(np.array([4])).dtype == np.float32
    assert sequence_loss_weights(torch.tensor([4, 0, 1])).tolist() == [0.25, 0.0, 1.0]
    assert cu_seqlens_values(np.array([3, 2, 4]), np.array([2, 1])).tolist() == [0, 3, 5, 0, 4]


def test_a_sequence_without_targets_weighs_nothing():
    labels, cu = np.array([X, X, 1, 2]), np.array([0, 2, 4])
    assert sequence_token_weights(labels, cu).tolist() == [0, 0, 0, 1]
