"""The channel through which the kernel representation ``d`` flows from KR layer to KR layer.

A :class:`ReprChain` belongs to one :class:`~lightning_kr.KRModel`; every KR layer of that model holds
a reference to it. During a forward pass the model opens a run with ``d_0``; each KR layer *reads*
the current ``d``, generates its kernel, and *writes* ``d_{i+1}``. Because layers read and write in
the order they execute, the chain follows execution order for any model, whatever its ``forward``
looks like (a ResNet's downsample convolution runs after ``conv2`` and receives ``conv2``'s ``d``).

The current ``d`` lives in thread-local storage of the chain object: no module-level global state,
independent models never interfere, nested or repeated calls restore the previous value, and
``nn.DataParallel`` replicas (one thread each) keep their own ``d``. Under DDP each process holds its
own model and so its own chain.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor


class ReprChain:
    """Holds the current kernel representation ``d`` (B, D) of one forward pass of one model."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def run(self, d0: Tensor) -> Iterator[ReprChain]:
        """Open a forward pass with the initial representation ``d0`` of shape (B, D)."""
        previous = getattr(self._local, "d", None)
        self._local.d = d0
        try:
            yield self
        finally:
            self._local.d = previous

    @property
    def active(self) -> bool:
        return getattr(self._local, "d", None) is not None

    def read(self, layer_name: str, batch_size: int) -> Tensor:
        """The current ``d`` (B, D) for the layer called ``layer_name`` that sees ``batch_size``."""
        d = getattr(self._local, "d", None)
        if d is None:
            raise RuntimeError(
                f"KR layer '{layer_name}' ran outside a KR forward pass, so it has no kernel "
                "representation d. Call the KRModel returned by kr_convert (not its .backbone), or "
                "call layer.forward_with_repr(x, d) with an explicit d of shape (B, repr_dim)."
            )
        if d.shape[0] != batch_size:
            raise RuntimeError(
                f"KR layer '{layer_name}' received an input with batch size {batch_size}, but the "
                f"kernel representation d has batch size {d.shape[0]}. KR layers need the batch on "
                "the first dimension of their input; exclude this layer from kr_convert "
                "(exclude=[...]) if the model reshapes the batch before it."
            )
        return d

    def write(self, d: Tensor) -> None:
        """Set ``d_{i+1}`` (B, D) for the next KR layer in execution order."""
        self._local.d = d

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> ReprChain:
        return ReprChain()
