import pytest
import torch

from distillkit_plugins.codir_banks import IndexBank, QueueBank, all_reduce_mean


def test_queue_is_fifo_and_wraps():
    bank = QueueBank(heads=2, size=5, dim=3)
    assert bank.negatives()[0].shape == (2, 0, 3)
    first = torch.arange(2 * 3 * 3, dtype=torch.float).reshape(2, 3, 3)
    bank.enqueue(first, torch.tensor([0, 1, 2]))
    keys, labels = bank.negatives()
    assert keys.shape == (2, 3, 3) and labels.tolist() == [0, 1, 2]
    second = -torch.ones(2, 4, 3)
    bank.enqueue(second, torch.tensor([7, 7, 7, 7]))
    keys, labels = bank.negatives()
    assert keys.shape == (2, 5, 3) and int(bank.pointer) == 2
    assert labels.tolist() == [7, 7, 2, 7, 7]  # slots 0,1 overwritten after wrapping
    torch.testing.assert_close(keys[:, 2], first[:, 2])


def test_queue_state_round_trips_through_state_dict():
    bank = QueueBank(1, 4, 2)
    bank.enqueue(torch.ones(1, 3, 2))
    restored = QueueBank(1, 4, 2)
    restored.load_state_dict(bank.state_dict())
    assert int(restored.filled) == 3 and int(restored.pointer) == 3
    torch.testing.assert_close(restored.keys, bank.keys)


def test_index_bank_momentum_update_and_sampling_avoids_own_slot():
    torch.manual_seed(0)
    bank = IndexBank(heads=1, size=10, dim=4, momentum=0.5)
    ids = torch.tensor([3, 7])
    old = bank.keys[:, ids].clone()
    new = torch.nn.functional.normalize(torch.randn(1, 2, 4), dim=-1)
    bank.update(ids, new, torch.tensor([1, 0]))
    expected = torch.nn.functional.normalize(0.5 * old + 0.5 * new, dim=-1)
    torch.testing.assert_close(bank.keys[:, ids], expected)
    assert bank.labels[ids].tolist() == [1, 0]
    draws = bank.sample_negatives(ids, 500)
    assert draws.shape == (2, 500)
    assert not (draws == ids.unsqueeze(1)).any()
    assert draws.min() >= 0 and draws.max() <= 9
    assert len(torch.unique(draws[0])) == 9  # every other slot is reachable


def test_sample_other_labels_skips_same_label_and_own_slot():
    bank = IndexBank(heads=1, size=10, dim=4)
    bank.labels.copy_(torch.tensor([0, 1, 0, 1, 2, -1, 0, 1, 2, -1]))
    ids = torch.tensor([5, 0, 3, 9, 4])  # 5 and 9 are unseen: their own slot has label -1 and is a candidate
    labels = torch.tensor([0, 0, 1, 2, 2])
    torch.manual_seed(0)
    index = bank.sample_other_labels(ids, labels, 2000)
    assert index.shape == (5, 2000) and index.dtype == torch.long
    assert (bank.labels[index] != labels.unsqueeze(1)).all()
    assert (index != ids.unsqueeze(1)).all()
    for row, label in enumerate(labels.tolist()):
        allowed = {i for i in range(10) if int(bank.labels[i]) != label and i != int(ids[row])}
        assert set(index[row].tolist()) == allowed  # 2000 draws reach every allowed slot (uniform)


def test_sampling_without_replacement_draws_distinct_slots_uniformly():
    bank = IndexBank(heads=1, size=12, dim=4)
    bank.labels.copy_(torch.tensor([0, 1] * 6))
    ids, labels = torch.tensor([0, 3, 4]), torch.tensor([0, 1, 0])
    torch.manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(400):
        index = bank.sample_other_labels(ids, labels, 5, replacement=False)
        assert all(len(set(row.tolist())) == 5 for row in index)  # no slot twice in a row
        assert (bank.labels[index] != labels.unsqueeze(1)).all()
        counts += torch.bincount(index[0], minlength=12)
    odd = counts[1::2]  # row 0 (label 0) draws 5 of the 6 odd slots: each with probability 5/6
    torch.testing.assert_close(odd / 400, torch.full((6,), 5 / 6), atol=0.06, rtol=0)
    plain = bank.sample_negatives(ids, 11, replacement=False)  # every other slot, each once
    for row, own in zip(plain.tolist(), ids.tolist(), strict=True):
        assert sorted(row) == [i for i in range(12) if i != own]
    # fewer eligible slots than negatives: drawn with replacement, as the release does
    many = bank.sample_other_labels(ids, labels, 9, replacement=False)
    assert many.shape == (3, 9) and (bank.labels[many] != labels.unsqueeze(1)).all()


def test_sample_other_labels_needs_another_class():
    bank = IndexBank(heads=1, size=3, dim=4)
    bank.labels.fill_(1)
    with pytest.raises(ValueError, match="at least two classes"):
        bank.sample_other_labels(torch.tensor([0]), torch.tensor([1]), 4)


def test_all_reduce_mean_is_identity_without_distributed():
    value = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_mean(value), value)
