"""Multiply-accumulate counts of a model and of its static counterpart, with fvcore.

The counting convention (one number per operator, from the shapes of its inputs and outputs):

* **Contractions** (convolution, ``linear``/``addmm``, ``matmul``/``mm``/``bmm``/``baddbmm``,
  ``einsum``, ``scaled_dot_product_attention``): one per multiply-add, as fvcore counts them
  ("one fused multiply-add = one flop"). ``matmul`` with broadcast batch dimensions and grouped
  convolutions (the ``groups = B`` per-sample kernels) are counted in full: ``numel(out) · K``.
* **Normalisation and pooling**: fvcore's defaults (``batch_norm`` in eval: 2 per element,
  ``layer_norm``: 5 per element, ``adaptive_avg_pool2d``: 1 per input element). Means, sums and the
  other average pools cost one per *input* element, as fvcore's ``adaptive_avg_pool2d``.
* **Elementwise arithmetic** (``mul``, ``div``, ``add``, ``sub``, ``sigmoid``, ``softmax``, ``cos``,
  ``sin``, ``outer``, activations with arithmetic such as ``gelu``/``hardswish``...): one per output
  element. Arithmetic on 0-d tensors is shape bookkeeping traced from Python integers and is free.
* **Free**: what fvcore already treats as free (data movement, ``cat``, ``arange``, ``relu``,
  ``clamp``, comparisons) plus im2col (``F.unfold``), padding, ``repeat``/``clone``, max pools and
  dropout: they move or select values and do no multiply-add.

Everything else is *unsupported*: counted as zero but listed in :attr:`MacCount.unsupported` (and
by :class:`~lightning_kr.callbacks.FlopsOverhead` in a warning), never dropped silently. Custom
``torch.autograd.Function`` forwards are traced inline, so the operators inside them are counted.

Counts are of what the model runs on the input given. KR layers pick how to apply per-sample
kernels by shape and batch size, so count one sample (``1 × C × H × W``) for per-image figures.
A convolution's taps that only read zero padding (a 3×3 kernel on a 1×1 map) are counted, as fvcore
counts them for a static convolution: KR's ``candidate_outputs`` strategy skips them when it runs,
but keeps them while traced, so that KR and its static model are compared on one convention.

With these rules a torchvision ``resnet18`` at 1×3×224×224 counts 1.82 GMACs (fvcore's figure, plus
8 residual additions); a KR model additionally pays for everything its KR layers, FFT stem and joint
head compute: ``h = GAP(X)``, representation fusion, the four attentions, the representation
generator, mixing the candidates, spatial and channel/filter scaling.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from numbers import Number
from typing import Any

import torch
from rich.table import Table
from torch import Tensor, nn

from lightning_kr.kr_model import find_kr_models
from lightning_kr.layers import KernelGenerator, KRLayer, KRMultiheadAttention
from lightning_kr.strategies import tracing

with warnings.catch_warnings():  # fvcore decorates helpers with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_jit, einsum_flop_jit, get_shape

Handle = Callable[[list[Any], list[Any]], Number | Counter]

# The multiply-add operators (convolutions, matrix products, attention). FlopCounterMode counts
# the same ones, at 2 flops per multiply-add (except attention on CPU, which it leaves out).
CONTRACTION_OPS = frozenset(
    {
        "conv",
        "linear",
        "addmm",
        "matmul",
        "mm",
        "bmm",
        "baddbmm",
        "einsum",
        "dot",
        "scaled_dot_product_attention",
        "native_multi_head_attention",
    }
)


def _numel(value: Any) -> int:
    shape = get_shape(value)
    return 0 if shape is None else prod(shape)


def elementwise_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """One per output element (0 for 0-d outputs: traced Python shape arithmetic)."""
    return _numel(outputs[0]) if get_shape(outputs[0]) else 0


def reduction_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """One per input element (means, sums, average pools)."""
    return _numel(inputs[0])


def contraction_macs(operand: int, op_name: str) -> Handle:
    """``numel(output) · K`` with ``K`` the last dimension of ``inputs[operand]``.

    Right for every broadcast of ``matmul`` (a batched left operand against a shared right one and
    the other way round), for ``mm``/``bmm``/``addmm``/``baddbmm`` and for ``linear`` on any
    number of leading dimensions.
    """

    def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
        shape = get_shape(inputs[operand])
        return Counter({op_name: _numel(outputs[0]) * (shape[-1] if shape else 0)})

    return handle


def conv_macs(inputs: list[Any], outputs: list[Any]) -> Counter:
    """fvcore's convolution count (``groups`` included, transposed convolutions too)."""
    return conv_flop_jit(inputs, outputs)


def einsum_macs(inputs: list[Any], outputs: list[Any]) -> Counter:
    """Two operands: the product of every index size (one multiply-add per term); more: fvcore."""
    equation = inputs[0].toIValue().replace(" ", "")
    operands = list(inputs[1].node().inputs())
    shapes = [get_shape(v) for v in operands]
    lhs = equation.split("->")[0].split(",")
    if len(operands) == 2 and "..." not in equation and all(s is not None for s in shapes):
        sizes: dict[str, int] = {}
        for letters, shape in zip(lhs, shapes, strict=True):
            for letter, size in zip(letters, shape, strict=True):
                sizes[letter] = max(sizes.get(letter, 1), size)  # broadcast size-1 dimensions
        return Counter({"einsum": prod(sizes.values())})
    return Counter({"einsum": int(einsum_flop_jit(inputs, outputs))})


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``Q K^T`` and ``softmax · V``: ``B·h·L·S·(E + E_v)`` (the softmax is not a multiply-add)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = prod(q[:-2])
    macs = batch * q[-2] * k[-2] * (q[-1] + v[-1])
    return Counter({"scaled_dot_product_attention": macs})


def native_mha_macs(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``nn.MultiheadAttention``'s inference fast path: projections and attention, as unfused."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    embed = inputs[3].toIValue()
    batch, q_len, k_len = q[0], q[1], k[1]
    projections = batch * (q_len + 2 * k_len) * embed * embed + batch * q_len * embed * embed
    attention = 2 * batch * q_len * k_len * embed
    return Counter({"native_multi_head_attention": projections + attention})


def _aten(names: str, in_place: bool = False) -> list[str]:
    """``aten::`` names, with the in-place variant (``mul_``) of each when ``in_place``."""
    ops = [f"aten::{name}" for name in names.split()]
    return ops + [f"{op}_" for op in ops] if in_place else ops


_ELEMENTWISE = _aten(
    "add sub rsub mul div neg reciprocal pow exp log sqrt rsqrt square abs sigmoid softmax "
    "log_softmax tanh gelu silu mish hardswish hardsigmoid elu leaky_relu prelu softplus erf cos "
    "sin outer addcmul addcdiv lerp",
    in_place=True,
)
_REDUCTIONS = _aten("mean sum avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool3d")
_FREE = _aten(
    "im2col col2im pad reflection_pad2d replication_pad2d repeat clone flip max_pool1d max_pool2d "
    "adaptive_max_pool2d hardtanh hardtanh_ relu6 feature_dropout alpha_dropout expand_as view_as "
    "pixel_shuffle channel_shuffle embedding index_select new_ones ones_like empty_like "
    "masked_fill_ zero_ fill_ where triu tril argmax topk sort lt le ne logical_not dropout_ "
    "feature_dropout_ alpha_dropout_"
)

MAC_HANDLES: dict[str, Handle | None] = {
    "aten::_convolution": conv_macs,
    "aten::matmul": contraction_macs(0, "matmul"),
    "aten::mm": contraction_macs(0, "mm"),
    "aten::bmm": contraction_macs(0, "bmm"),
    "aten::dot": contraction_macs(0, "dot"),
    "aten::addmm": contraction_macs(1, "addmm"),
    "aten::baddbmm": contraction_macs(1, "baddbmm"),
    "aten::linear": contraction_macs(1, "linear"),
    "aten::einsum": einsum_macs,
    "aten::scaled_dot_product_attention": sdpa_macs,
    "aten::_native_multi_head_attention": native_mha_macs,
    **dict.fromkeys(_ELEMENTWISE, elementwise_macs),
    **dict.fromkeys(_REDUCTIONS, reduction_macs),
    **dict.fromkeys(_FREE),
}
"""fvcore handles added to ``FlopCountAnalysis``'s defaults (``None``: explicitly free)."""


@dataclass(frozen=True)
class MacCount:
    """What :func:`count_macs` found.

    Attributes:
        total: multiply-accumulates of one forward pass on the given input.
        by_module: MACs per qualified submodule name (``""``: the whole model), fvcore's
            ``by_module()``: a module's count includes its children.
        by_operator: MACs per operator (``conv``, ``matmul``, ``mul``, ...).
        unsupported: operators that ran but have no handle: ``{aten op: number of calls}``.
        params: number of parameters of the model.
    """

    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    unsupported: dict[str, int]
    params: int

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    @property
    def contraction_macs(self) -> int:
        """MACs of convolutions and matrix products only (what ``FlopCounterMode`` counts, ×2)."""
        return sum(v for k, v in self.by_operator.items() if k in CONTRACTION_OPS)


def _tensor_only_state_dict(model: nn.Module) -> Callable[..., dict]:
    def state_dict(*args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False):
        destination = OrderedDict() if destination is None else destination
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
        for name, tensor in named:
            destination[prefix + name] = tensor if keep_vars else tensor.detach()
        return destination

    return state_dict


class _NoGradients(tuple):
    """``ctx.needs_input_grad`` of an inlined forward: False for every input."""

    def __getitem__(self, index: Any) -> bool:
        return False


class _InlineContext:
    """Stands in for an autograd ``ctx`` when a custom ``Function``'s forward runs inline."""

    needs_input_grad: tuple[bool, ...] = _NoGradients()
    saved_tensors: tuple[Tensor, ...] = ()

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass

    def save_for_forward(self, *tensors: Tensor) -> None:
        pass

    def mark_dirty(self, *args: Tensor) -> None:
        pass

    def mark_non_differentiable(self, *args: Tensor) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


@contextmanager
def _inline_autograd_functions() -> Iterator[None]:
    """While tracing, run custom ``torch.autograd.Function`` forwards as plain Python.

    The tracer records a custom ``Function`` as one opaque ``prim::PythonOp`` (which no handle can
    count) or fails on non-tensor arguments; inlined, its forward's aten operators are counted like
    any others. Calls outside a trace are untouched.
    """
    original = torch.autograd.Function.__dict__["apply"]
    plain_setup = torch.autograd.function._SingleLevelFunction.setup_context

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not tracing.counting():
            return original.__get__(None, cls)(*args, **kwargs)
        if cls.setup_context is not plain_setup:  # forward(*args) + setup_context(ctx, ...)
            return cls.forward(*args, **kwargs)
        return cls.forward(_InlineContext(), *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Eval mode, ``no_grad``, a state dict of tensors only and inlined custom autograd functions
    while tracing; all restored after.

    The JIT tracer feeds every ``state_dict`` value to the graph as an input, so a module with
    non-tensor extra state (``KRModel`` records its conversion options; torchmetrics metrics keep
    list states) cannot be traced. Only the parameters and buffers are needed to count.
    """
    modes = {module: module.training for module in model.modules()}
    model.__dict__["state_dict"] = _tensor_only_state_dict(model)
    try:
        model.eval()
        with torch.no_grad(), _inline_autograd_functions():
            yield
    finally:
        del model.__dict__["state_dict"]
        for module, training in modes.items():
            module.training = training


def count_macs(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    handles: Mapping[str, Handle | None] | None = None,
) -> MacCount:
    """Count the multiply-accumulates of ``model(*example_input)`` with fvcore.

    The model runs once, traced, in eval mode under ``no_grad``; the train/eval mode of every
    submodule is restored afterwards. Counts are for the input as given: pass one sample
    (``1 × C × H × W``) for per-image figures.

    Args:
        model: any ``nn.Module`` (a ``LightningModule`` counts its ``forward``).
        example_input: a tensor or a tuple of positional tensors on the model's device.
        handles: extra fvcore handles ``{"aten::op": handle or None}``, added to :data:`MAC_HANDLES`.

    Returns:
        A :class:`MacCount`.

    Example::

        >>> from torchvision.models import resnet18
        >>> round(count_macs(resnet18(), torch.randn(1, 3, 224, 224)).gmacs, 2)
        1.82
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**{**MAC_HANDLES, **(handles or {})})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with _traceable(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices raised while tracing
        total = analysis.total()
    return MacCount(
        total=int(total),
        by_module={k: int(v) for k, v in analysis.by_module().items()},
        by_operator={k: int(v) for k, v in analysis.by_operator().items()},
        unsupported=dict(analysis.unsupported_ops()),
        params=sum(p.numel() for p in model.parameters()),
    )


@contextmanager
def static_counterpart(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every :class:`KRModel` inside replaced by ``KRModel.to_static()``.

    The replacement is temporary and done in place (no copy of the rest of ``module``, which may be
    a ``LightningModule`` attached to a ``Trainer``); the KR models are put back on exit. A module
    that is itself a ``KRModel`` yields its static copy.
    """
    kr_models = find_kr_models(module)
    if any(not name for name, _ in kr_models):
        yield module.to_static()
        return
    parents = []
    for name, kr in kr_models:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        parents.append((parent, child, kr))
        setattr(parent, child, kr.to_static())
    try:
        yield module
    finally:
        for parent, child, kr in parents:
            setattr(parent, child, kr)


@dataclass(frozen=True)
class LayerOverhead:
    """The cost one KR layer (or the FFT stem, or the joint head) adds to its static layer."""

    name: str
    kind: str
    static_macs: int
    kr_macs: int
    generator_macs: int

    @property
    def added_macs(self) -> int:
        return self.kr_macs - self.static_macs


@dataclass(frozen=True)
class MacOverhead:
    """MACs of a KR model and of its static counterpart (see :func:`count_overhead`)."""

    static: MacCount
    kr: MacCount
    layers: list[LayerOverhead] = field(default_factory=list)

    @property
    def overhead_pct(self) -> float:
        return 100.0 * (self.kr.total - self.static.total) / max(self.static.total, 1)

    def table(self, top_n: int = 10) -> Table:
        """A rich table of the ``top_n`` layers by added MACs (in millions)."""
        added = self.kr.total - self.static.total

        def share(macs: int) -> str:
            return f"{100 * macs / added:.1f}%" if added else "-"

        table = Table(
            title=(
                f"KR overhead: {self.static.gmacs:.3f} → {self.kr.gmacs:.3f} GMACs "
                f"({self.overhead_pct:+.2f}%), params {self.static.params / 1e6:.2f} M → "
                f"{self.kr.params / 1e6:.2f} M"
            )
        )
        table.add_column("layer", overflow="fold")
        table.add_column("type")
        for column in ("static", "KR", "added", "generator", "share"):
            table.add_column(column, justify="right")
        rows = sorted(self.layers, key=lambda r: r.added_macs, reverse=True)
        for row in rows[:top_n]:
            table.add_row(
                row.name,
                row.kind,
                f"{row.static_macs / 1e6:.3f}",
                f"{row.kr_macs / 1e6:.3f}",
                f"{row.added_macs / 1e6:+.3f}",
                f"{row.generator_macs / 1e6:.3f}",
                share(row.added_macs),
            )
        rest = added - sum(r.added_macs for r in rows[:top_n])
        if len(rows) > top_n:
            label = f"{len(rows) - top_n} more layers"
            table.add_row(label, "", "", "", f"{rest / 1e6:+.3f}", "", share(rest))
        unsupported = sorted({*self.kr.unsupported, *self.static.unsupported})
        table.caption = "MMACs per sample; generator = fusion + attentions + representation. " + (
            f"Not counted (no handle): {', '.join(unsupported)}"
            if unsupported
            else "Every operator counted."
        )
        return table


def _layer_rows(module: nn.Module, static: MacCount, kr: MacCount) -> list[LayerOverhead]:
    rows = []
    for path, kr_model in find_kr_models(module):
        prefix = f"{path}." if path else ""
        static_prefix = prefix if path else ""
        units: list[tuple[str, nn.Module]] = []
        for name, sub in kr_model.backbone.named_modules():
            inside_mha = any(
                name.startswith(f"{n}.") for n, m in units if isinstance(m, KRMultiheadAttention)
            )
            if isinstance(sub, KRMultiheadAttention) or (
                isinstance(sub, KRLayer) and not inside_mha
            ):
                units.append((name, sub))
        for name, sub in units:
            full = f"{prefix}backbone.{name}"
            generators = [
                f"{full}.{n}" for n, m in sub.named_modules() if isinstance(m, KernelGenerator)
            ]
            rows.append(
                LayerOverhead(
                    name=f"{prefix}{name}",
                    kind=type(sub).__name__,
                    static_macs=static.by_module.get(f"{static_prefix}{name}", 0),
                    kr_macs=kr.by_module.get(full, 0),
                    generator_macs=sum(kr.by_module.get(g, 0) for g in generators),
                )
            )
        for part in ("stem", "head"):
            sub = getattr(kr_model, part)
            if sub is not None:
                rows.append(
                    LayerOverhead(
                        f"{prefix}{part}",
                        type(sub).__name__,
                        0,
                        kr.by_module.get(f"{prefix}{part}", 0),
                        0,
                    )
                )
    return rows


def count_overhead(
    module: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    handles: Mapping[str, Handle | None] | None = None,
) -> MacOverhead:
    """MACs of ``module`` and of its static counterpart (every ``KRModel`` → ``to_static()``).

    A module without any ``KRModel`` is its own static counterpart: the overhead is 0.

    Args:
        module: a :class:`KRModel`, or any module (``LightningModule`` included) that contains one.
        example_input: as for :func:`count_macs`.
        handles: extra fvcore handles.

    Example::

        >>> from torchvision.models import resnet18
        >>> overhead = count_overhead(kr_convert(resnet18()), torch.randn(1, 3, 224, 224))
        >>> overhead.static.gmacs, overhead.kr.gmacs, overhead.overhead_pct  # doctest: +SKIP
    """
    kr = count_macs(module, example_input, handles=handles)
    if not find_kr_models(module):
        return MacOverhead(static=kr, kr=kr, layers=[])
    with static_counterpart(module) as static_module:
        static = count_macs(static_module, example_input, handles=handles)
    return MacOverhead(static=static, kr=kr, layers=_layer_rows(module, static, kr))


__all__ = [
    "CONTRACTION_OPS",
    "MAC_HANDLES",
    "Handle",
    "LayerOverhead",
    "MacCount",
    "MacOverhead",
    "count_macs",
    "count_overhead",
    "static_counterpart",
]
