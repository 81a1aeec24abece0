"""``lightning_kr.utilities.distributed``: per-sample rows of every rank, each sample once."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from lightning_kr.utilities.distributed import gather_rows, sampler_layout


def on_ranks(rows_per_rank: list[dict[str, Tensor | None]]) -> list[dict[str, np.ndarray]]:
    """``gather_rows`` on every rank at once: one thread per rank, ``all_gather`` a real collective
    between the threads (each blocks until every rank has handed in its tensor)."""
    world = len(rows_per_rank)
    barrier = threading.Barrier(world, timeout=10)
    handed_in: list[Tensor | None] = [None] * world
    results: list[dict[str, np.ndarray] | None] = [None] * world

    def rank(r: int) -> None:
        def all_gather(x: Tensor) -> Tensor:
            handed_in[r] = x
            barrier.wait()
            out = torch.stack(handed_in)
            barrier.wait()  # nobody hands in the next tensor before everyone has this one
            return out

        results[r] = gather_rows(rows_per_rank[r], all_gather)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result is not None for result in results), "a rank failed"
    return results


def test_sampler_layout():
    data = TensorDataset(torch.arange(7))
    shared = DistributedSampler(data, num_replicas=3, rank=2, shuffle=False)
    assert sampler_layout(DataLoader(data, sampler=shared)) == (3, 2, 7)
    assert sampler_layout(DataLoader(data, batch_size=2)) == (1, 0, 7)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    assert sampler_layout(DataLoader(Stream())) == (1, 0, math.inf)


def test_one_process_keeps_each_position_once_in_order():
    rows = {
        "index": torch.tensor([3, 1, 3, 0]),
        "label": torch.tensor([7, 5, 7, 4]),
        "x": torch.arange(8.0).view(4, 2),
        "missing": None,
    }
    out = gather_rows(rows)
    assert set(out) == {"index", "label", "x"}
    assert out["index"].tolist() == [0, 1, 3] and out["label"].tolist() == [4, 5, 7]
    assert out["x"].tolist() == [[6.0, 7.0], [2.0, 3.0], [0.0, 1.0]]


def test_ranks_of_a_distributed_sampler_and_a_rank_with_no_rows():
    """Rank r holds positions r, r + 3, ...; rank 2 collected nothing (its rows are empty)."""
    no_ids = torch.zeros(0, dtype=torch.long)
    ranks = [
        {"index": torch.tensor([0, 3]), "x": torch.tensor([[0.0, 0.5], [3.0, 3.5]]), "y": None},
        {"index": torch.tensor([1]), "x": torch.tensor([[1.0, 1.5]]), "y": None},
        {"index": no_ids, "x": None, "y": None},
    ]
    for out in on_ranks(ranks):  # the same on every rank
        assert set(out) == {"index", "x"}  # no rank collected "y"
        assert out["index"].tolist() == [0, 1, 3]
        assert out["x"].tolist() == [[0.0, 0.5], [1.0, 1.5], [3.0, 3.5]]


def test_copies_a_plain_sampler_gives_every_rank_count_once():
    rows = {"index": torch.tensor([0, 1, 2]), "label": torch.tensor([2, 0, 1])}
    first, second = on_ranks([rows, dict(rows)])
    assert first["index"].tolist() == second["index"].tolist() == [0, 1, 2]
    assert first["label"].tolist() == [2, 0, 1]
