"""Memory banks under torch.distributed (gloo, 2 CPU processes): every rank must hold the identical bank."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillkit_plugins.codir_banks import IndexBank, QueueBank

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # each rank sees different keys, as with a distributed sampler
        queue, index = QueueBank(2, 10, 4), IndexBank(2, 12, 4)
        for _ in range(4):
            keys = torch.randn(2, 3, 4)
            ids = torch.arange(3) + 3 * rank
            queue.enqueue(keys, torch.full((3,), rank))
            index.update(ids, torch.nn.functional.normalize(keys, dim=-1), torch.full((3,), rank))
        results[rank] = {
            "queue": queue.keys.clone(),
            "queue_labels": queue.labels.clone(),
            "pointer": int(queue.pointer),
            "filled": int(queue.filled),
            "index": index.keys.clone(),
            "index_labels": index.labels.clone(),
        }
    finally:
        dist.destroy_process_group()


def test_banks_identical_on_both_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    first, second = results[0], results[1]
    for key in ("queue", "queue_labels", "index", "index_labels"):
        assert torch.equal(first[key], second[key]), key
    # the pointer advanced by the global batch: 4 steps x 3 keys x 2 ranks = 24 keys into 10 slots
    assert first["pointer"] == second["pointer"] == 24 % 10
    assert first["filled"] == 10
    assert set(first["queue_labels"].tolist()) == {0, 1}  # keys from both ranks are in the queue
    assert set(first["index_labels"][:6].tolist()) == {0, 1}
