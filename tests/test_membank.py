import torch

from distillkit.membank import IndexBank, QueueBank


def test_queue_is_fifo_and_wraps():
    bank = QueueBank(layers=2, size=5, dim=3)
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
    bank = IndexBank(layers=1, size=10, dim=4, momentum=0.5)
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
