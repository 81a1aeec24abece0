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

Activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``) re-runs a block
during backward, after the forward pass has closed its run. The chain records the ``d`` (detached)
each layer read in the latest run; a layer re-run during backward reads that record and writes
nothing, so the recomputed block sees the values of the original pass and the chain's state is left
alone. The reentrant variant (``use_reentrant=True``) runs the block under ``no_grad`` and
back-propagates only through the block's arguments and outputs: the chain opens a
:class:`~lightning_kr.layers.reentrant_checkpoint.CheckpointRegion` for it, which carries the
gradients of the ``d`` entering and leaving the block (see that module).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

import torch
from torch import Tensor

from lightning_kr.layers.reentrant_checkpoint import (
    CheckpointRegion,
    anchor_output,
    reentrant_checkpoint_ctx,
)
from lightning_kr.strategies import tracing

T = TypeVar("T")


class _Pending:
    """The chain's state in a run that waits for ``d_0`` (see :meth:`ReprChain.start`)."""

    def __repr__(self) -> str:
        return "<d_0 pending>"


PENDING = _Pending()

BatchLayout = Literal["batch", "stacked", "interleaved"]
"""How a layer's input rows relate to the model's samples: one row per sample (``"batch"``), ``k``
stacked copies of the batch (``"stacked"``: rows ``[x_1..x_B, x'_1..x'_B]``, optical flow's two
frames) or ``k`` consecutive rows per sample (``"interleaved"``: MViT's heads, windows)."""


def _in_backward() -> bool:
    """Whether this thread is executing a backward pass (where checkpointed blocks recompute)."""
    return torch._C._current_graph_task_id() != -1


def rows_to_samples(d: Tensor, samples: int, layout: BatchLayout) -> Tensor:
    """Average the ``k`` rows of each sample of ``d`` (k·B, D) laid out as ``layout``: (B, D)."""
    if d.shape[0] == samples:
        return d
    size = d.shape[-1]
    if layout == "stacked":
        return d.view(-1, samples, size).mean(0)
    return d.view(samples, -1, size).mean(1)


class ReprChain:
    """Holds the current kernel representation ``d`` (B, D) of one forward pass of one model."""

    def __init__(self) -> None:
        self._local = threading.local()
        # Latest run's d per layer name (detached) and how often the layer read one: what a layer
        # recomputed by activation checkpointing reads. Not thread-local: backward may run on
        # another thread (the autograd engine's device threads).
        self._recorded: dict[str, tuple[Tensor, int]] = {}

    @contextmanager
    def run(self, d0: Tensor | None = None) -> Iterator[ReprChain]:
        """Open a forward pass with the initial representation ``d0`` of shape (B, D), or, without
        ``d0``, one whose ``d_0`` is set by :meth:`start` (from the images the model's first layer
        sees)."""
        previous = getattr(self._local, "d", None)
        previous_region = getattr(self._local, "region", None)
        if previous is None:
            self._recorded = {}
        self._local.d = PENDING if d0 is None else d0
        self._local.region = None
        try:
            yield self
        finally:
            self._local.d = previous
            self._local.region = previous_region

    def start(self, d0: Tensor) -> None:
        """Set ``d_0`` (B, D) of a run opened without one (later calls in the run are ignored)."""
        if getattr(self._local, "d", None) is PENDING:
            if not torch.is_grad_enabled() and not tracing.compiling():
                ctx = reentrant_checkpoint_ctx()
                if ctx is not None:  # the checkpointed block holds the model's first layer
                    self._local.region = CheckpointRegion(ctx, None, self._replay)
            self._local.d = d0

    @property
    def pending(self) -> bool:
        """A run is open and waits for ``d_0``."""
        return getattr(self._local, "d", None) is PENDING

    @property
    def recomputing(self) -> bool:
        """No run is open on this thread and a backward pass is: a non-reentrant checkpoint is
        recomputing a block (the layers read the ``d`` recorded in the latest run)."""
        return getattr(self._local, "d", None) is None and _in_backward()

    @property
    def active(self) -> bool:
        return getattr(self._local, "d", None) is not None

    def read(
        self,
        layer_name: str,
        batch_size: int,
        layout: BatchLayout = "batch",
        training: bool = True,
    ) -> Tensor:
        """The current ``d`` (B, D) for the layer called ``layer_name`` that sees ``batch_size``.

        A layer whose input holds ``k·B`` rows (``layout`` ``"stacked"`` or ``"interleaved"``, see
        :data:`BatchLayout`) gets each sample's ``d`` on each of its rows: (k·B, D).
        """
        d = getattr(self._local, "d", None)
        if d is None and _in_backward():
            return self._recorded_for(layer_name, batch_size)
        if d is PENDING:
            raise RuntimeError(
                f"KR layer '{layer_name}' ran before the model's first layer, which sets d_0: "
                "the conversion's probe pass saw another order. Convert the model with an "
                "example_input that takes the same path through forward."
            )
        if d is None:
            raise RuntimeError(
                f"KR layer '{layer_name}' ran outside a KR forward pass, so it has no kernel "
                "representation d. Call the KRModel returned by kr_convert (not its .backbone), or "
                "call layer.forward_with_repr(x, d) with an explicit d of shape (B, repr_dim)."
            )
        d = self._through_checkpoints(d, training)
        if layout != "batch" and d.shape[0] != batch_size and batch_size % d.shape[0] == 0:
            copies = batch_size // d.shape[0]
            d = d.repeat(copies, 1) if layout == "stacked" else d.repeat_interleave(copies, 0)
        if d.shape[0] != batch_size:
            raise RuntimeError(
                f"KR layer '{layer_name}' received an input with batch size {batch_size}, but the "
                f"kernel representation d has batch size {d.shape[0]}. KR layers need the batch on "
                "the first dimension of their input; exclude this layer from kr_convert "
                "(exclude=[...]) if the model reshapes the batch before it."
            )
        _, calls = self._recorded.get(layer_name, (None, 0))
        self._recorded[layer_name] = (d.detach(), calls + 1)
        return d

    def _through_checkpoints(self, d: Tensor, training: bool) -> Tensor:
        """``d`` as a reader here must see it, given reentrant checkpoints (see module doc).

        Under ``no_grad`` the call stack is searched for a reentrant checkpoint (a few µs) only
        where one can matter: a training-mode layer, a ``d`` with history, or inside a region."""
        if tracing.compiling():  # a traced graph holds no reentrant checkpoint
            return d
        region: CheckpointRegion | None = getattr(self._local, "region", None)
        if torch.is_grad_enabled():
            if region is not None:  # the first reader after a checkpointed block
                d = self._local.d = region.stand_in(d)
                self._local.region = None
            return d
        if not (training or d.requires_grad or region is not None):
            return d  # eval-mode inference
        ctx = reentrant_checkpoint_ctx()
        if ctx is None or (region is not None and region.ctx is ctx):
            return d
        # A block that starts here; right after another checkpointed block (``region``), its d_in
        # is that block's output.
        self._local.region = CheckpointRegion(ctx, d, self._replay, upstream=region)
        return d

    def settle(self, output: T) -> T:
        """The model's ``output``, tied to the ``d`` left by a checkpointed block that nothing read
        (a model without a joint head whose last KR layers ran under a reentrant checkpoint)."""
        region: CheckpointRegion | None = getattr(self._local, "region", None)
        if region is None or not torch.is_grad_enabled():
            return output
        self._local.region = None
        return anchor_output(output, region.stand_in(self._local.d))

    @contextmanager
    def _replay(self, start: Tensor | None) -> Iterator[threading.local]:
        """Run a reentrant checkpoint's recomputation with ``start`` as the current ``d`` (None:
        the block computes ``d_0``); the yielded state's ``d`` is the ``d`` left at its end."""
        saved = getattr(self._local, "d", None), getattr(self._local, "region", None)
        self._local.d = PENDING if start is None else start
        self._local.region = None
        try:
            yield self._local
        finally:
            self._local.d, self._local.region = saved

    def _recorded_for(self, layer_name: str, batch_size: int) -> Tensor:
        """The ``d`` a layer read in the latest run, for its recomputation during backward."""
        d, calls = self._recorded.get(layer_name, (None, 0))
        if d is None or d.shape[0] != batch_size:
            raise RuntimeError(
                f"KR layer '{layer_name}' is recomputed during backward (activation "
                "checkpointing), but the latest forward pass of its model did not run it with this "
                "batch. Call backward before the model's next forward pass."
            )
        if calls > 1:
            raise RuntimeError(
                f"KR layer '{layer_name}' ran {calls} times in one forward pass and is recomputed "
                "during backward (activation checkpointing): which d each run saw is ambiguous. "
                "Leave the blocks that reuse a KR layer out of the checkpointed region."
            )
        return d

    def write(self, d: Tensor, layout: BatchLayout = "batch") -> None:
        """Set ``d_{i+1}`` (B, D) for the next KR layer in execution order (ignored when a layer is
        recomputed during backward, outside any forward pass). A layer that saw ``k·B`` rows
        (``layout``) writes (k·B, D): the ``k`` rows of each sample are averaged."""
        current = getattr(self._local, "d", None)
        if current is None or current is PENDING:
            return
        self._local.d = rows_to_samples(d, current.shape[0], layout)
        if torch.is_grad_enabled():
            self._local.region = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
        self._recorded = {}

    def __deepcopy__(self, memo: dict) -> ReprChain:
        return ReprChain()
