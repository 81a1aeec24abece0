"""``kr_convert``: turn any model (torchvision, timm or yours) into a KR model, without editing its code.

Four steps, each readable on its own (``lightning_kr/conversion/``):

1. **probe** (:mod:`~lightning_kr.conversion.probe`): run the model once as its training step would
   and record which convertible modules are *called*, in which order, with which batch;
2. **decide** (:mod:`~lightning_kr.conversion.decide`): a pure function from a module and what the
   probe saw to "convert" or the reason it stays static;
3. **create** (:mod:`~lightning_kr.conversion.create`): a table from module type to KR factory;
4. **replace**: ``nn.Module.set_submodule``, then wrap the backbone in a :class:`KRModel` with the
   ``d_0`` stem on the first layer's input and, for classifiers, the joint head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kr.config import KRConfig
from lightning_kr.conversion.create import (
    COMPOSITE_CHILDREN,
    ENTRY_TYPES,
    FACTORIES,
    STATIC_TYPES,
    base_type,
    create,
)
from lightning_kr.conversion.decide import Targets, decide
from lightning_kr.conversion.plan import ConversionPlan
from lightning_kr.conversion.probe import Probe, probe
from lightning_kr.conversion.targets import matches
from lightning_kr.conversion.weights import start_note, weights_are_trained
from lightning_kr.kr_model import KRModel
from lightning_kr.layers.kr_layer import KRLayer
from lightning_kr.models import BUILDER_ATTRIBUTE
from lightning_kr.report import ConversionReport, LayerDecision, count_parameters

CANDIDATE_TYPES = (*FACTORIES, *STATIC_TYPES, *ENTRY_TYPES)


def kr_convert(
    model: nn.Module,
    config: KRConfig | None = None,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    example_input: Tensor | tuple | None = None,
    input_size: int | tuple[int, ...] | None = None,
    in_channels: int = 3,
    inplace: bool = False,
    **overrides: Any,
) -> KRModel:
    """Convert ``model`` into a :class:`KRModel`.

    Trained weights (normalisation layers not as constructed) get attention heads that start random and ramp
    in from the static function, fresh ones zero heads (``KRConfig.dynamic_init``, decided by
    :func:`~lightning_kr.conversion.weights.weights_are_trained` unless set).

    Every convolution (1-, 2-, 3-D), ``Linear``, self-attention ``MultiheadAttention`` and Swin
    window attention that runs with the batch on its first dimension becomes a KR layer, except the
    first layer executed (stem / patch embedding) and a classifier's final layer, which stays as the
    feature branch of the joint head. The candidate kernels start from the static weights.
    ``model.report`` says what was replaced, what was not, and why.

    Args:
        model: any ``nn.Module``: a classifier returning logits (B, K) (or a tuple whose first item
            is) gets the joint head; other outputs (segmentation maps, detection losses, flows) are
            returned as they are.
        config: the :class:`KRConfig` (default ``KRConfig()``); every option is documented there.
        filter_fn: ``(qualified_name, module) -> bool``, applied after ``include`` / ``exclude``.
        example_input: what one training step passes to ``model``: a tensor, or a tuple of
            positional arguments (detection: ``(images, targets)``; RAFT: ``(image1, image2)``).
            Default: two random images (2, C, H, W) of ``input_size``.
        input_size: side, ``(H, W)`` or, for videos, ``(T, H, W)`` of the default example (default:
            the model's ``image_size``, or 224).
        in_channels: channels of the default example.
        inplace: convert ``model`` itself instead of a copy.
        **overrides: :class:`KRConfig` options replacing those of ``config`` (``kernel_num=4``).

    Returns:
        The :class:`KRModel`.

    Example::

        >>> from torchvision.models import resnet18
        >>> model = kr_convert(resnet18(), kernel_num=4)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1000])
    """
    config = KRConfig.with_overrides(config, **overrides)
    if isinstance(model, KRModel):
        raise ValueError("this model is already a KRModel; convert the original architecture")
    if not inplace:
        model = copy.deepcopy(model)
    args = example_arguments(model, example_input, input_size, in_channels)
    plan, report = plan_conversion(model, config, args, filter_fn)
    return apply_plan(model, config, plan, report)


def plan_conversion(
    model: nn.Module,
    config: KRConfig,
    args: tuple,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> tuple[ConversionPlan, ConversionReport]:
    """Steps 1 and 2: probe ``model`` with the positional arguments ``args`` and decide what to
    replace. Returns the plan and a report that lists the skipped modules and why (the replaced
    ones are added by :func:`apply_plan`). ``model`` is left as it is."""
    # 1. probe
    names = {m: n for n, m in model.named_modules() if n}
    watched = {m: n for m, n in names.items() if isinstance(m, CANDIDATE_TYPES)}
    seen = probe(model, args, watched, ENTRY_TYPES)
    layers = [n for n in seen.calls if isinstance(model.get_submodule(n), ENTRY_TYPES)]
    classifier = layers[-1] if seen.num_classes is not None and len(layers) > 1 else None

    # 2. decide
    targets = Targets(config.include, config.exclude, filter_fn)
    skipped: list[LayerDecision] = []
    to_replace: list[str] = []
    handled: list[str] = []  # composites: their children are decided with them
    for name, module in model.named_modules():
        if not name or not isinstance(module, CANDIDATE_TYPES):
            continue
        if any(name.startswith(f"{parent}.") for parent in handled):
            continue
        verdict = decide(name, module, seen.calls.get(name), seen, targets, classifier)
        if verdict.unsupported and matches(name, config.include):
            raise ValueError(
                f"cannot convert '{name}' ({type(module).__name__}): {verdict.reason}; remove it "
                "from include"
            )
        base = base_type(module)
        if base in COMPOSITE_CHILDREN:
            handled.append(name)
        if verdict.reason is not None:
            n_params = count_parameters(module)
            skipped.append(
                LayerDecision(
                    name, type(module).__name__, "skipped", verdict.reason, n_params, n_params
                )
            )
        else:
            to_replace.append(name)
    if not to_replace:
        raise ValueError(
            "kr_convert matched no layer to convert (include="
            f"{config.include!r}, exclude={config.exclude!r}, filter_fn="
            f"{'set' if filter_fn else None}). Candidates were: "
            + ", ".join(d.name for d in skipped)[:500]
        )

    def converted(name: str) -> bool:
        return any(name == r or name.startswith(f"{r}.") for r in to_replace)

    stem_on, stem_shape, stem_rows, stem_layout = stem_input(seen)
    plan = ConversionPlan(
        replace=tuple(to_replace),
        layouts={
            n: c.layout
            for n, c in seen.calls.items()
            if c.layout not in (None, "batch") and converted(n)
        },
        num_classes=seen.num_classes,
        stem_on=stem_on,
        stem_input_shape=stem_shape,
        stem_rows=stem_rows,
        stem_layout=stem_layout,
        unread_repr_from=_last_single_run(seen, to_replace)
        if config.uses_repr and seen.num_classes is None
        else None,
    )
    report = ConversionReport(
        decisions=skipped,
        first_layer=seen.entry,
        classifier=classifier,
        probe_mode=seen.mode,
        probe_fallback_reason=seen.fallback_reason,
        output=seen.output_type,
    )
    return plan, report


def apply_plan(
    model: nn.Module,
    config: KRConfig,
    plan: ConversionPlan,
    report: ConversionReport | None = None,
) -> KRModel:
    """Steps 3 and 4: replace the modules of ``plan.replace`` in ``model`` (in place) by their KR
    layers and wrap it in a :class:`KRModel`, as the plan says. ``dynamic_init`` /
    ``dynamic_warmup`` left at None are decided by ``model``'s weights (:meth:`KRConfig.for_weights`).
    ``report`` (its skipped modules and probe facts) is completed with the replaced modules, the
    parameter counts and how the heads start."""
    report = report if report is not None else ConversionReport()
    report.decisions = [d for d in report.decisions if d.action != "replaced"]
    report.notes = []
    report.params_before = count_parameters(model)

    # how the attention heads start, where the config leaves it to the weights
    trained = weights_are_trained(model)
    start = start_note(trained, config.dynamic_init, config.dynamic_warmup)
    if start is not None:
        report.notes.append(start)
    config = config.for_weights(bool(trained))

    # 3. create and 4. replace
    for name in plan.replace:
        module = model.get_submodule(name)
        new = create(module, config, name)
        model.set_submodule(name, new)
        report.decisions.append(
            LayerDecision(
                name,
                type(module).__name__,
                "replaced",
                f"→ {type(new).__name__}",
                count_parameters(module),
                count_parameters(new),
            )
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    report.decisions.sort(key=lambda d: order.get(d.name, len(order)))
    kr_model = KRModel(
        model,
        config,
        report,
        num_classes=plan.num_classes,
        stem_input_shape=plan.stem_input_shape,
        stem_on=plan.stem_on,
        stem_rows=plan.stem_rows,
        stem_layout=plan.stem_layout,
    )
    kr_model.plan = plan
    kr_model.builder = getattr(model, BUILDER_ATTRIBUTE, None)
    for name, layer in kr_model.kr_layers():
        layer.attach(kr_model.chain, name, batch_layout=plan.layouts.get(name, "batch"))
    if config.uses_repr and kr_model.head is None:
        note = f"no joint head: the model returns {report.output}, not class logits"
        if plan.unread_repr_from is not None:
            module = model.get_submodule(plan.unread_repr_from)
            writer = [m for m in module.modules() if isinstance(m, KRLayer)][-1]
            writer.generator.drop_repr_output()
            note = (
                f"no joint head: the model returns {report.output}, not class logits; "
                f"'{plan.unread_repr_from}' (the last KR layer to run) generates no d_(i+1), "
                "which nothing would read"
            )
        report.notes.append(note)
    reference = next(model.parameters(), None)
    if reference is not None:
        kr_model.to(dtype=reference.dtype)
    report.params_after = count_parameters(kr_model)
    return kr_model


def example_arguments(
    model: nn.Module,
    example_input: Tensor | tuple | list | None,
    input_size: int | tuple[int, ...] | None,
    in_channels: int,
) -> tuple:
    """The positional arguments of the probe pass: ``example_input`` as a tuple, or two random
    images (videos when ``input_size`` is ``(T, H, W)``) on the model's device and dtype."""
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, tuple):
        return example_input
    if example_input is not None:
        raise ValueError(
            "example_input must be a tensor or a tuple of the model's positional arguments; got "
            f"{type(example_input).__name__} (wrap a list of images as (images,))"
        )
    if input_size is None:
        input_size = (
            getattr(model, "image_size", None)
            or getattr(model, "transform_input_size", None)
            or 224
        )
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None else None
    return (torch.randn(2, in_channels, *size, device=device, dtype=dtype),)


def stem_input(seen: Probe) -> tuple[str, tuple[int, ...], int, str]:
    """Where the ``d_0`` stem reads its images: ``(module name, one sample's shape, rows per
    sample, their layout)``. The first layer's input when it is an image or video batch (after the
    model's own preprocessing: detection's transform); else the model's input (an MLP on flattened
    pixels)."""
    entry_shape = seen.entry_input_shape
    if seen.entry is not None and len(entry_shape) in (4, 5):
        rows = seen.batch_multiple(seen.entry)
        layout = "batch" if rows == 1 else seen.calls[seen.entry].layout
        if rows is not None and layout is not None:
            return seen.entry, entry_shape[1:], rows, layout
    if len(seen.model_input_shape) in (4, 5):
        return "", seen.model_input_shape[1:], 1, "batch"
    return seen.entry or "", (entry_shape or seen.model_input_shape)[1:], 1, "batch"


def _last_single_run(seen: Probe, replaced: list[str]) -> str | None:
    """The module holding KR layers that runs last, if it runs once: without a joint head nothing
    reads the ``d`` its last KR layer writes (that layer's KRG would receive no gradient)."""
    runs = [
        n
        for n in seen.call_order
        if n in replaced or any(r.startswith(f"{n}.") or n.startswith(f"{r}.") for r in replaced)
    ]
    if not runs or seen.call_order.count(runs[-1]) != 1:
        return None
    return runs[-1]
