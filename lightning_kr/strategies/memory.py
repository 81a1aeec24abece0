"""Dtypes, memory formats and batch slices shared by the strategies' computations."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 32 * 2**20
"""Largest transient tensor (bytes) a chunk of the batch may create in a recomputing autograd
Function; 32 MiB is also glibc's largest ``mmap`` threshold, below which freed blocks are reused
instead of returned to the OS."""


def batch_chunks(batch: int, per_sample_elements: int, element_size: int) -> list[slice]:
    """Slices of the batch whose transient tensors stay within :data:`CHUNK_BYTES`."""
    size = max(1, min(batch, CHUNK_BYTES // max(1, per_sample_elements * element_size)))
    return [slice(start, min(batch, start + size)) for start in range(0, batch, size)]


def memory_format(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last (and not also contiguous) input, else contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution in, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def channels_last_rows(x: Tensor) -> Tensor:
    """(c, C, H, W) → (c, H·W, C)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2] * x.shape[3], x.shape[1])
