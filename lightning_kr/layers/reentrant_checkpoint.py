"""Exact gradients of ``d`` through ``torch.utils.checkpoint(block, x, use_reentrant=True)``.

The reentrant checkpoint runs ``block`` under ``no_grad`` and, during backward, runs it again with
autograd and back-propagates the gradient of the block's *outputs* to its *tensor arguments*. The
kernel representation does not travel through either: the block's first KR layer reads ``d_in``
from the chain, its last one leaves ``d_out`` there. Without help, the gradient that ``d_out``
receives from the layers after the block, and the gradient that ``d_in`` receives from inside the
block, would both be lost. A :class:`CheckpointRegion` carries them:

1. **Forward, inside the checkpoint** (the chain sees a read under ``no_grad`` whose call stack
   passes through ``CheckpointFunction.forward``): the region remembers ``d_in`` (or that the block
   itself computes ``d_0``, when it holds the model's first layer) and replaces the checkpoint's
   ``ctx.run_function`` by :meth:`CheckpointRegion.recompute`.
2. **Forward, after the block**: the first reader of ``d_out`` (the next KR layer, the joint head,
   the next checkpointed block, or the model's output when nothing reads it) gets a stand-in,
   :class:`RegionOutput`, whose node has ``d_in`` as an input.
3. **Backward**: autograd runs nodes in reverse creation order, so the stand-in (created after the
   checkpoint) runs *before* the checkpoint's node and stashes the gradient of ``d_out``;
   :meth:`~CheckpointRegion.recompute` runs the block again from a leaf copy of ``d_in`` and grafts
   that gradient onto the block's output (:class:`GraftGradient`), so one backward pass through
   the recomputed block carries both; the node that produced ``d_in`` (created *before* the
   checkpoint, so run after it) receives the leaf's gradient through a pre-hook.

Every step checks that this order held and raises an error that names ``use_reentrant=False``
otherwise, so a gradient is either exact or refused, never silently short. Tested against the
unwrapped model in ``tests/test_checkpointing.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__

USE_NON_REENTRANT = (
    "Pass use_reentrant=False to torch.utils.checkpoint (KR layers recompute exactly under the "
    "non-reentrant checkpoint)."
)


def reentrant_checkpoint_ctx() -> Any | None:
    """The ``ctx`` of the innermost reentrant checkpoint whose forward is on the call stack, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return frame.f_locals.get("ctx")
        frame = frame.f_back
    return None


class RegionOutput(torch.autograd.Function):
    """Forward: ``d_out`` (B, D), as a tensor with history. Backward: stash its gradient in the
    region (for the block's recomputation); ``anchor`` (``d_in``) gets none from here, the input
    only ties the node that produced ``d_in`` into the backward pass."""

    @staticmethod
    def forward(ctx: Any, d_out: Tensor, region: CheckpointRegion, anchor: Tensor) -> Tensor:
        ctx.region = region
        ctx.anchor = torch.empty_like(anchor, device="meta")  # shape only
        return d_out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor]:
        region: CheckpointRegion = ctx.region
        if region.recomputed_in_this_backward:
            raise RuntimeError(
                "a block run under torch.utils.checkpoint(..., use_reentrant=True) was recomputed "
                "before the layers after it passed back the gradient of the kernel representation "
                f"d. {USE_NON_REENTRANT}"
            )
        region.grad_out = grad if region.grad_out is None else region.grad_out + grad
        return None, None, grad.new_zeros(ctx.anchor.shape)


class GraftGradient(torch.autograd.Function):
    """``output`` unchanged; its backward also sends ``grad_d`` into ``d`` (B, D), so that the
    checkpoint's single backward call through the recomputed block carries both gradients."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, d: Tensor, grad_d: Tensor) -> Tensor:
        ctx.save_for_backward(grad_d)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (grad_d,) = ctx.saved_tensors
        return grad, grad_d, None


class CheckpointRegion:
    """One call of a reentrant checkpoint whose block runs KR layers.

    Args:
        ctx: the checkpoint's autograd context (its ``run_function`` is wrapped).
        d_in: the ``d`` (B, D) the block's first KR layer read, or ``None`` when the block computes
            ``d_0`` itself (it holds the model's first layer).
        replay: ``replay(start) -> context manager`` of the chain that runs the recomputation with
            ``start`` as the current ``d``; the context's value exposes the ``d`` left at the end.
        upstream: the checkpointed block right before this one, whose ``d_out`` is this ``d_in``
            (its recomputation, which runs after this one's, collects this block's input gradient).
    """

    def __init__(
        self,
        ctx: Any,
        d_in: Tensor | None,
        replay: Callable[[Any], Any],
        upstream: CheckpointRegion | None = None,
    ) -> None:
        self.ctx = ctx
        self.d_in = d_in
        self.grad_out: Tensor | None = None
        self.d_in_leaf: Tensor | None = None
        self.downstream: list[CheckpointRegion] = []
        self._recomputed_in: int | None = None  # the backward pass (graph task) that recomputed
        self._replay = replay
        self._run_block = ctx.run_function
        ctx.run_function = self.recompute
        self.input_needs_grad = upstream is not None or (d_in is not None and d_in.requires_grad)
        # The tensor with history that ties the node producing the first d_in of a run of
        # consecutive checkpointed blocks into the backward pass (see stand_in).
        self.anchor = upstream.anchor if upstream is not None else None
        if upstream is not None:
            upstream.downstream.append(self)
        elif d_in is not None and d_in.requires_grad:
            self.anchor = d_in
            edge = torch.autograd.graph.get_gradient_edge(d_in)
            edge.node.register_prehook(self._deliver_input_gradient(edge.output_nr))

    @property
    def recomputed_in_this_backward(self) -> bool:
        return self._recomputed_in == torch._C._current_graph_task_id()

    def stand_in(self, d_out: Tensor) -> Tensor:
        """``d_out`` for the readers after the block (see :class:`RegionOutput`)."""
        with torch.enable_grad():
            anchor = self.anchor
            if anchor is None:
                anchor = torch.zeros((), device=d_out.device, requires_grad=True)
            return RegionOutput.apply(d_out, self, anchor)

    def recompute(self, *inputs: Any) -> Any:
        """The checkpoint's backward: run the block again from a leaf copy of ``d_in``."""
        grad_out, self.grad_out = self.grad_out, None
        for block in self.downstream:  # the next checkpointed blocks, recomputed before this one
            if not block.recomputed_in_this_backward:
                raise RuntimeError(
                    "a block run under torch.utils.checkpoint(..., use_reentrant=True) was "
                    "recomputed before the checkpointed block after it, whose kernel "
                    f"representation d it feeds. {USE_NON_REENTRANT}"
                )
            if block.d_in_leaf is not None and block.d_in_leaf.grad is not None:
                grad = block.d_in_leaf.grad
                grad_out = grad if grad_out is None else grad_out + grad
        if self.d_in is None:
            start = None
        else:
            start = self.d_in.detach().requires_grad_(self.input_needs_grad)
        self.d_in_leaf = start
        with self._replay(start) as replay:
            outputs = self._run_block(*inputs)
            d_out = replay.d
        self._recomputed_in = torch._C._current_graph_task_id()
        if grad_out is None or not isinstance(d_out, Tensor) or not d_out.requires_grad:
            return outputs
        return _graft(outputs, d_out, grad_out)

    def _deliver_input_gradient(self, index: int) -> Callable[[tuple], tuple | None]:
        def deliver(grad_outputs: tuple) -> tuple | None:
            if not self.recomputed_in_this_backward:
                raise RuntimeError(
                    "the kernel representation d entering a block run under "
                    "torch.utils.checkpoint(..., use_reentrant=True) needs its gradient before the "
                    f"block was recomputed (the block's output is not used?). {USE_NON_REENTRANT}"
                )
            grad = self.d_in_leaf.grad if self.d_in_leaf is not None else None
            if grad is None:
                return None
            grads = list(grad_outputs)
            grads[index] = grad if grads[index] is None else grads[index] + grad
            return tuple(grads)

        return deliver


def _graft(outputs: Any, d: Tensor, grad_d: Tensor) -> Any:
    """``outputs`` with :class:`GraftGradient` on its first tensor that requires grad."""
    if isinstance(outputs, Tensor) and outputs.requires_grad:
        return GraftGradient.apply(outputs, d, grad_d)
    if isinstance(outputs, tuple):
        for i, item in enumerate(outputs):
            if isinstance(item, Tensor) and item.requires_grad:
                return (*outputs[:i], GraftGradient.apply(item, d, grad_d), *outputs[i + 1 :])
    # No output carries a gradient: back-propagate d's gradient through the block on its own.
    torch.autograd.backward(d, grad_d)
    return outputs


class _Anchor(torch.autograd.Function):
    """``output`` (a copy) whose backward also reaches ``d``'s node (with no gradient from here)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, d: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def anchor_output(output: Any, d: Tensor) -> Any:
    """``output`` (a tensor, or a tuple / list / dict holding one) with its first floating tensor that
    requires grad tied to ``d`` (B, D) by :class:`_Anchor`; unchanged when it holds none."""
    done = False

    def tie(item: Any) -> Any:
        nonlocal done
        if done:
            return item
        if isinstance(item, Tensor):
            if item.requires_grad and item.is_floating_point():
                done = True
                return _Anchor.apply(item, d)
            return item
        if isinstance(item, dict):
            return type(item)((key, tie(value)) for key, value in item.items())
        if isinstance(item, tuple) and hasattr(item, "_fields"):
            return type(item)(*(tie(value) for value in item))
        if isinstance(item, (tuple, list)):
            return type(item)(tie(value) for value in item)
        return item

    return tie(output)
