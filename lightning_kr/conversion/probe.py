"""Step 1 of ``kr_convert``: run the model once, as a training step would, and record what it does.

One forward pass (training mode, ``no_grad``, BatchNorm statistics and the RNG restored afterwards)
with the user's example — a batch of images, or the positional arguments of the model's ``forward``
(detection in training: ``(images, targets)``; optical flow: ``(image1, image2)``) — records, for
every module of a convertible type (:data:`~lightning_kr.conversion.create.FACTORIES`), whether it is
*called*, in which order, with which batch sizes, and (for ``MultiheadAttention``) whether it is
self-attention. It also records the input of the first layer that runs (what the ``d_0`` stem will
see) and what the model returns (class logits or not).

Where a layer sees ``k`` times the batch (optical flow stacks the two frames on the batch, MViT
pools each head as a sample, detection's box head sees the proposals of every image), a second pass
in eval mode changes one sample of the example and looks at which rows of the layer's input change:
``k`` stacked copies of the batch (rows ``1, B + 1, ...``) or ``k`` consecutive rows per sample
(rows ``k .. 2k - 1``), the same ``k`` in both modes, can take each sample's ``d``
(:data:`~lightning_kr.layers.repr_chain.BatchLayout`); anything else cannot (detection's proposals:
their number per image differs between training and inference).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kr.outputs import class_logits


@dataclass
class LayerCalls:
    """What the probe saw of one module: the batch size of each call, and its first input's shape."""

    batches: list[int | None] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    self_attention: bool = True  # MultiheadAttention: query is key is value at every call
    layout: str | None = None  # BatchLayout of its rows (tested in eval mode); None: no fixed one


@dataclass
class Probe:
    """What one forward pass showed about a model.

    Attributes:
        samples: ``B``, the number of samples in the example.
        calls: every convertible module that was called, by qualified name, in first-call order.
        entry: the first Conv/Linear that ran (the stem / patch embedding), or ``None``.
        entry_input_shape: the shape of its input (what the ``d_0`` stem sees).
        model_input_shape: the shape of the model's first positional argument, if a tensor.
        num_classes: ``K`` when the model returns class logits (B, K) (or a tuple whose first item
            is); ``None`` for any other output (dense maps, detection losses, flows).
        output_type: the type name of the output, for the report.
        call_order: the name of every watched module at each of its calls, in call order (the
            last one that runs has no reader of its ``d`` without a joint head).
        mode: ``"train"``, or ``"eval"`` when the training-mode pass failed.
        fallback_reason: that failure.
    """

    samples: int
    calls: dict[str, LayerCalls] = field(default_factory=dict)
    entry: str | None = None
    entry_input_shape: tuple[int, ...] = ()
    model_input_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    output_type: str = ""
    call_order: list[str] = field(default_factory=list)
    mode: str = "train"
    fallback_reason: str | None = None

    def batch_multiple(self, name: str) -> int | None:
        """``k`` when every call of ``name`` saw ``k·B`` samples (1: the batch itself), else None."""
        batches = self.calls[name].batches
        if not batches or any(b is None or b % self.samples for b in batches):
            return None
        multiples = {b // self.samples for b in batches}
        return multiples.pop() if len(multiples) == 1 else None


def count_samples(args: tuple) -> int:
    """``B`` of a model's positional arguments: the first tensor's first dimension, or the length of
    the first list of tensors (detection models take a list of images)."""
    for arg in args:
        if isinstance(arg, Tensor) and arg.dim() >= 1:
            return arg.shape[0]
        if isinstance(arg, list | tuple) and arg and all(isinstance(a, Tensor) for a in arg):
            return len(arg)
    raise ValueError(
        "kr_convert could not find the batch in example_input: pass a tensor (B, ...) or a tuple of "
        "positional arguments whose first is a tensor (B, ...) or a list of B image tensors"
    )


def call_batch(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int | None, tuple[int, ...]]:
    """The batch size a module call sees (``None`` if its input has no batch dimension), and the
    shape of its input."""
    if isinstance(module, nn.MultiheadAttention):
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, Tensor) or query.dim() != 3:
            return None, ()
        return query.shape[0 if module.batch_first else 1], tuple(query.shape)
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if first is None or first.dim() < 2:
        return None, () if first is None else tuple(first.shape)
    return first.shape[0], tuple(first.shape)


def _is_self_attention(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    query = args[0] if args else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    value = args[2] if len(args) > 2 else kwargs.get("value")
    return query is key and key is value


def _run(model: nn.Module, args: tuple, modules: dict[nn.Module, str], record) -> Any:
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        return model(*args)
    finally:
        for handle in handles:
            handle.remove()


def probe(
    model: nn.Module,
    args: tuple,
    modules: dict[nn.Module, str],
    entry_types: tuple[type, ...],
) -> Probe:
    """Run ``model(*args)`` once in training mode (eval mode if that fails, with a warning).

    Args:
        model: the model to convert (its parameters, buffers and the RNG are left as they were).
        args: the positional arguments of one training step.
        modules: the modules to watch, with their qualified names.
        entry_types: the types that can be the entry layer (convolutions and linear layers).

    Returns:
        The :class:`Probe`.
    """
    result = Probe(samples=count_samples(args))
    first = args[0] if args else None
    if isinstance(first, Tensor):
        result.model_input_shape = tuple(first.shape)

    def record(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        name = modules[module]
        calls = result.calls.setdefault(name, LayerCalls())
        batch, shape = call_batch(module, call_args, call_kwargs)
        if not calls.batches:
            calls.input_shape = shape
        calls.batches.append(batch)
        result.call_order.append(name)
        if isinstance(module, nn.MultiheadAttention):
            calls.self_attention &= _is_self_attention(module, call_args, call_kwargs)
        if result.entry is None and isinstance(module, entry_types):
            result.entry = name
            result.entry_input_shape = shape

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                model.train()
                out = _run(model, args, modules, record)
            except Exception as train_error:
                # Some models cannot run a training step on this example (a detection model without
                # targets, a tiny batch); eval mode still shows every layer that runs at inference.
                result.mode = "eval"
                result.fallback_reason = f"{type(train_error).__name__}: {train_error}"
                warnings.warn(
                    "kr_convert's probe pass failed in training mode "
                    f"({result.fallback_reason}) and ran in eval mode instead: layers that run only "
                    "in training (auxiliary heads, losses) are not converted. Pass example_input= "
                    "with what the model's training step passes (e.g. (images, targets) for "
                    "detection, or a larger batch) to probe in training mode.",
                    stacklevel=3,
                )
                result.calls.clear()
                result.call_order.clear()
                result.entry = None
                model.eval()
                try:
                    out = _run(model, args, modules, record)
                except Exception as error:
                    raise ValueError(
                        f"kr_convert's probe pass failed on example_input {_describe(args)}: "
                        f"{error}. Pass example_input= (or input_size=) with what this model's "
                        "forward accepts (a tensor, or a tuple of positional arguments)."
                    ) from error
            batched = [name for name in result.calls if result.batch_multiple(name) is not None]
            for name in batched:
                result.calls[name].layout = "batch" if result.batch_multiple(name) == 1 else None
            _find_layouts(model, args, modules, result, batched)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    logits = class_logits(out, result.samples)
    result.num_classes = None if logits is None else logits.shape[-1]
    result.output_type = type(out).__name__
    return result


def _find_layouts(
    model: nn.Module, args: tuple, modules: dict[nn.Module, str], result: Probe, names: list[str]
) -> None:
    """Set the layout of each layer of ``names`` (which saw ``k·B`` rows, ``k >= 1``): in eval mode,
    change sample 1 of the example and see which rows of the layer's first input change. A layer
    whose rows are not the samples in a fixed layout (Keypoint R-CNN's head sees as many positive
    proposals as there are images, by chance) gets no layout; one that runs only in training
    (auxiliary heads) keeps what the training pass showed."""
    if result.samples < 2 or not names:
        return
    seen: dict[str, list[Tensor | None]] = {name: [] for name in names}

    def record(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        name = modules[module]
        if name in seen and not seen[name]:
            first = next(
                (a for a in (*call_args, *call_kwargs.values()) if isinstance(a, Tensor)), None
            )
            if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
                first = first.transpose(0, 1)
            seen[name].append(None if first is None else _row_fingerprints(first))

    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _run(model, args, modules, record)
            original = {name: inputs[:1] for name, inputs in seen.items()}
            for inputs in seen.values():
                inputs.clear()
            torch.manual_seed(0)
            _run(model, _change_sample(args, 1, result.samples), modules, record)
    except Exception as error:  # the eval pass is a check; without it the training pass stands
        warnings.warn(
            f"kr_convert could not check the batch layout of its layers in eval mode ({error}); "
            "layers are converted on what the training-mode pass showed",
            stacklevel=4,
        )
        return
    for name in names:
        k = result.batch_multiple(name) or 1
        before, after = (original[name] or [None])[0], (seen[name] or [None])[0]
        if before is None or after is None:
            continue  # runs only in training
        layout = None
        if (
            before.shape == after.shape
            and before.dim() >= 1
            and before.shape[0] == k * result.samples
        ):
            rows = set(torch.nonzero(before != after).flatten().tolist())
            if rows == {1 + j * result.samples for j in range(k)}:
                layout = "batch" if k == 1 else "stacked"
            elif rows == set(range(k, 2 * k)):
                layout = "interleaved"
        result.calls[name].layout = layout


def _row_fingerprints(x: Tensor) -> Tensor:
    """One number per row of ``x`` (rows, ...) that changes when the row does: its dot product with
    fixed random weights (a row's values are not kept: the probe of a detection model at 800 px
    would hold every activation twice)."""
    rows = (
        x.detach().reshape(x.shape[0], -1).double() if x.dim() else x.detach().view(1, 1).double()
    )
    weights = torch.rand(
        rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    return rows @ weights.to(rows.device)


def _change_sample(args: tuple, index: int, samples: int) -> tuple:
    """``args`` with sample ``index`` replaced by noise, in every tensor (B, ...) and list of B."""

    def change(arg: Any) -> Any:
        if (
            isinstance(arg, Tensor)
            and arg.is_floating_point()
            and arg.dim()
            and arg.shape[0] == samples
        ):
            arg = arg.clone()
            arg[index] = torch.randn_like(arg[index]) * (arg.std() + 1)
            return arg
        if isinstance(arg, list | tuple) and len(arg) == samples and _all_tensors(arg):
            items = list(arg)
            items[index] = torch.randn_like(items[index]) * (items[index].std() + 1)
            return type(arg)(items) if isinstance(arg, tuple) else items
        return arg

    return tuple(change(a) for a in args)


def _all_tensors(items: Iterable) -> bool:
    return all(isinstance(i, Tensor) and i.is_floating_point() for i in items)


def _describe(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, Tensor):
            parts.append(f"tensor{tuple(a.shape)}")
        elif isinstance(a, list | tuple):
            parts.append(f"{type(a).__name__} of {len(a)}")
        else:
            parts.append(type(a).__name__)
    return "(" + ", ".join(parts) + ")"
