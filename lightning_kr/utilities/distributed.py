"""Per-sample rows collected on every DDP rank, put back together once, in sampler order.

A validation loop under DDP hands each rank its own share of the samples (a ``DistributedSampler``
pads the shares to one length with copies of the first samples; a plain sampler gives every rank all
of them). :func:`sampler_layout` tells which position of the sampler order a rank's ``i``-th sample
holds; :func:`gather_rows` collects the rows of every rank and keeps each position once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


def sampler_layout(loader: Any) -> tuple[int, int, float]:
    """``(replicas, rank, number of samples)`` of a data loader's sampler.

    The ``i``-th sample this rank sees holds position ``i · replicas + rank`` of the sampler order. A
    ``DistributedSampler`` (the loader's sampler, or its batch sampler's) gives its own replicas and
    rank; any other sampler counts as one replica with every sample. The number of samples is that
    of the dataset (``inf`` for one without a length).
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, DistributedSampler) and batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", sampler)
    if isinstance(sampler, DistributedSampler):
        return sampler.num_replicas, sampler.rank, len(sampler.dataset)
    try:
        return 1, 0, len(loader.dataset)
    except (AttributeError, TypeError):
        return 1, 0, math.inf


def gather_rows(
    rows: Mapping[str, Tensor | None],
    all_gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """The rows of every rank, each sampler position once, sorted by position.

    Args:
        rows: this rank's rows: ``"index"`` (N,) the sampler position of each row (see
            :func:`sampler_layout`), and any other entries (N,) or (N, E) on the CPU. ``None``
            stands for (0, E) float32 rows on a rank that collected none, ``E`` taken from the other
            ranks; an entry that is ``None`` on every rank is left out. Every rank passes the same
            keys.
        all_gather: ``tensor (...) -> (world size, ...)`` across the ranks (a ``LightningModule``'s
            ``all_gather``, moving the tensor to the module's device first); ``None`` in a single
            process. Every rank must call :func:`gather_rows` when it is given: it runs collectives.

    Returns:
        Every entry as a NumPy array, rows in sampler order, repeated positions dropped.

    Example::

        >>> rows = {"index": torch.tensor([2, 0, 2]), "label": torch.tensor([5, 3, 5])}
        >>> gather_rows(rows)["label"].tolist()
        [3, 5]
    """
    if all_gather is not None:
        rows = _all_rows(rows, all_gather)
    present = {key: value for key, value in rows.items() if value is not None}
    _, first = np.unique(present["index"].numpy(), return_index=True)  # sorted by position
    return {key: value.numpy()[first] for key, value in present.items()}


def _all_rows(
    rows: Mapping[str, Tensor | None], all_gather: Callable[[Tensor], Tensor]
) -> dict[str, Tensor | None]:
    """Every rank's rows concatenated in rank order (padded to one length for the collectives)."""
    keys = list(rows)
    count = rows["index"].shape[0]
    widths = [
        -1 if rows[k] is None else (rows[k].shape[1] if rows[k].dim() > 1 else 0) for k in keys
    ]
    meta = all_gather(torch.tensor([count, *widths])).cpu().view(-1, 1 + len(keys))
    counts = meta[:, 0].tolist()
    out: dict[str, Tensor | None] = {}
    for column, key in enumerate(keys, start=1):
        width = int(meta[:, column].max())
        if width < 0:
            out[key] = None
            continue
        local = rows[key] if rows[key] is not None else torch.zeros(0, width)
        padded = local.new_zeros(max(counts), *local.shape[1:])
        padded[:count] = local
        gathered = all_gather(padded).cpu()
        out[key] = torch.cat([gathered[rank, : counts[rank]] for rank in range(len(counts))])
    return out
