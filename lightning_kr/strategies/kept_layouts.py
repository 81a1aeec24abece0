"""Candidate kernels rearranged for a strategy's matrix product, kept between inference calls.

``"taps"`` and ``"candidate_outputs"`` multiply activations by the candidates laid out as one
matrix (input channels and taps by output channels), which is a copy of every candidate: on the
small maps these strategies serve, that copy is a tenth of an inference call (ResNet-18 at 32²,
batch 50, KR 1x: ``copy_`` and ``index_select`` 11 % of the time, ``recipes/profile_step.py
--inference``). At inference the candidates do not change between calls, so the copy is kept:
keyed by the weight tensor and the layout, and checked against the weight's version counter and
storage, so an optimiser step, ``load_state_dict`` or any in-place change makes a new copy. A kept
copy is dropped with its weight.

Only where nothing needs the computation itself: no gradient recorded, and no tracer, exporter,
compiler or dispatch mode (they record, count or compile the layer's own operators). Memory: one
rearranged copy of each kept layer's candidates (a model's converted layers that run these
strategies at inference), released by :func:`clear` or with the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from lightning_kr.strategies import tracing

_kept: dict[tuple[int, Hashable], tuple[weakref.ref, int, int, Tensor]] = {}


def keeps() -> bool:
    """Whether this call may use kept layouts (inference without any recorder)."""
    return not (
        torch.is_grad_enabled()
        or tracing.plain_operators()
        or tracing.compiling()
        or tracing.dispatch_mode()
    )


def kept_layout(weight: Tensor, layout: Hashable, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(weight)``, kept for the next call with the same ``weight`` (same tensor, version
    and storage) and ``layout`` where :func:`keeps`; computed afresh otherwise.

    Args:
        weight: the candidates (n, C_out, C_in / g, *k), a layer's parameter.
        layout: what distinguishes this rearrangement from others of the same weight (the
            strategy's name, the taps kept, the groups...).
        make: the rearrangement; its result must depend on ``weight`` and ``layout`` only.
    """
    if not keeps():
        return make(weight)
    key = (id(weight), layout)
    entry = _kept.get(key)
    if entry is not None:
        owner, version, pointer, value = entry
        if owner() is weight and version == weight._version and pointer == weight.data_ptr():
            return value
    value = make(weight)
    if value.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        value = value.clone()  # a view would keep its weight alive, and its entry with it
    _kept[key] = (
        weakref.ref(weight, lambda _, key=key: _kept.pop(key, None)),
        weight._version,
        weight.data_ptr(),
        value,
    )
    return value


def clear() -> None:
    """Drop every kept layout (their memory is freed with the last reference)."""
    _kept.clear()
