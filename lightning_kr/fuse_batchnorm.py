"""``fuse_batchnorm``: fold every eval-mode BatchNorm that directly follows a convolution into it.

A KR convolution computes, for sample ``b`` and output channel ``o`` (``KRConvNd``, every
strategy)::

    y_b[o] = a_f[b, o] · conv(a_c[b] ⊙ x_b, K_b)[o] + bias[o],   K_b = √n Σ_n a_kn[b, n] · a_s[b] ⊙ V_n

and an eval-mode BatchNorm after it ``z[o] = s[o] · y[o] + t[o]`` with ``s = γ / √(var + ε)`` and
``t = β − mean · s``. ``s`` scales output channel ``o``; the filter attention ``a_f`` scales the same
channel per sample, the kernel-number attention mixes candidates, the spatial attention scales
taps and the channel attention scales inputs: all are linear and none touches the output-channel
axis of the candidates except ``a_f``, which commutes with ``s``. The bias is added after the filter
attention, unattended. So::

    z_b[o] = a_f[b, o] · conv(a_c[b] ⊙ x_b, K'_b)[o] + bias'[o]
    V'_n[o] = s[o] · V_n[o]              (candidate kernels, every n)
    bias'[o] = s[o] · bias[o] + t[o]     (bias = 0 when the layer had none)

exactly; the attentions are computed from the layer's input and ``d`` alone and do not change. A
static ``nn.Conv1d/2d/3d`` (the first layer ``kr_convert`` leaves static) folds the same way.

Which BatchNorm "directly follows" which convolution is read from a ``torch.fx`` graph of the
model (KR layers are leaves), never from module order: the BatchNorm's only input must be the
convolution's output and that output must have no other user. Models ``torch.fx`` cannot trace
are traced submodule by submodule (the :class:`~lightning_kr.KRModel` wrapper always is: its
backbone threads ``d`` through the chain, outside the data flow). Anything unsure is skipped and
reported with its reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from rich.table import Table
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_kr.layers.kr_conv1d import KRConv1d
from lightning_kr.layers.kr_conv2d import KRConv2d
from lightning_kr.layers.kr_conv3d import KRConv3d
from lightning_kr.report import RichReport

KR_CONVOLUTIONS = (KRConv1d, KRConv2d, KRConv3d)
STATIC_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Exact types: a subclass may transform its weight in forward (weight standardisation), which a
# per-channel scale would not survive.
INSIDE_KR_LAYER = "inside a KR layer (its attention branch)"


@dataclass
class FusionDecision:
    """One BatchNorm: folded into ``conv`` or skipped, and why."""

    name: str
    conv: str | None
    action: str  # "folded" | "skipped"
    reason: str


@dataclass
class FusionReport(RichReport):
    """Every BatchNorm of the model and what :func:`fuse_batchnorm` did with it."""

    decisions: list[FusionDecision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. submodules torch.fx could not trace

    @property
    def folded(self) -> list[FusionDecision]:
        return [d for d in self.decisions if d.action == "folded"]

    @property
    def skipped(self) -> list[FusionDecision]:
        return [d for d in self.decisions if d.action == "skipped"]

    def __rich__(self) -> Table:
        table = Table(
            title=f"fuse_batchnorm: {len(self.folded)} folded, {len(self.skipped)} skipped"
        )
        if self.notes:
            table.caption = "\n".join(self.notes)
        for column in ("batchnorm", "into", "action", "reason"):
            table.add_column(column, overflow="fold")
        for d in self.decisions:
            style = "green" if d.action == "folded" else "yellow"
            table.add_row(d.name, d.conv or "", f"[{style}]{d.action}[/{style}]", d.reason)
        return table


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a KR (or static) convolution into that
    convolution's candidate kernels and bias, and replace it with ``nn.Identity``. In place.

    The folded model computes the same function in eval mode (to rounding) with one BatchNorm
    pass less per convolution, and exports as before (:func:`~lightning_kr.export.to_onnx`). It
    is for inference: the running statistics are gone, so it neither trains as before nor loads
    the unfused model's ``state_dict``.

    Args:
        model: in eval mode (``model.eval()``); any model, converted by
            :func:`~lightning_kr.kr_convert` or not.

    Returns:
        ``model``, with ``model.fusion_report``: a :class:`FusionReport` naming every BatchNorm,
        folded (into which convolution) or skipped (why).

    Raises:
        ValueError: ``model`` or one of its BatchNorms is in training mode (BatchNorm then
            normalises with batch statistics, which no kernel can hold).

    Example::

        >>> model = kr_convert(torchvision.models.resnet18(), input_size=64).eval()
        >>> model = fuse_batchnorm(model)
        >>> len(model.fusion_report.folded)
        20
    """
    training = [name or "model" for name, m in model.named_modules() if _is_bn(m) and m.training]
    if model.training or training:
        where = "the model" if model.training else f"BatchNorm {training[0]!r}"
        raise ValueError(
            f"fuse_batchnorm folds BatchNorm's running statistics, but {where} is in training "
            "mode (batch statistics); call model.eval() first"
        )
    report = FusionReport()
    pairs: dict[str, str] = {}
    reasons: dict[str, str] = {}
    _find_pairs(model, "", pairs, reasons, report.notes)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    uses.update(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    inner = 0
    for bn_name, module in model.named_modules():
        if not _is_bn(module):
            continue
        if reasons.get(bn_name) == INSIDE_KR_LAYER:
            inner += 1
            continue
        conv_name = pairs.get(bn_name)
        reason = reasons.get(bn_name, "not reached by torch.fx tracing (see the notes)")
        if conv_name is not None:
            conv = model.get_submodule(conv_name)
            reason = _why_not(conv, module, uses)
        if conv_name is None or reason:
            report.decisions.append(FusionDecision(bn_name, conv_name, "skipped", reason))
            continue
        fold_into(conv, module)
        report.decisions.append(FusionDecision(bn_name, conv_name, "folded", _describe(conv)))
    if inner:
        report.notes.append(
            f"{inner} BatchNorm(s) inside KR layers' attention branches left as they are"
        )
    for decision in report.folded:
        model.set_submodule(decision.name, nn.Identity())
    model.fusion_report = report
    return model


def fold_into(conv: nn.Module, bn: _BatchNorm) -> None:
    """``conv`` followed by ``bn`` (eval mode) as one convolution: scale the output channels of
    its weight by ``s = γ / √(var + ε)`` and set its bias to ``s · bias + β − mean · s``.

    ``conv.weight``: (n, C_out, C_in / g, *k) for a KR convolution (every candidate), (C_out,
    C_in / g, *k) for a static one; ``conv.bias``: (C_out,) or ``None`` (then one is created).
    ``s`` and the bias are computed in float64; the weight is scaled in place in its dtype.
    """
    weight = conv.weight
    axis = 1 if isinstance(conv, KR_CONVOLUTIONS) else 0
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    view = [1] * weight.dim()
    view[axis] = -1
    with torch.no_grad():
        weight.mul_(scale.to(weight.dtype).view(view))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def _is_kr_part(module: nn.Module) -> bool:
    """A KR layer, stem or head (``lightning_kr.layers``): one node; its own BatchNorms (the
    kernel generator's) are left as they are."""
    return type(module).__module__.startswith("lightning_kr.layers")


def _leave_inside(module: nn.Module, name: str, reasons: dict[str, str]) -> None:
    for inner, m in module.named_modules(prefix=name):
        if _is_bn(m):
            reasons[inner] = INSIDE_KR_LAYER


def _describe(conv: nn.Module) -> str:
    if isinstance(conv, KR_CONVOLUTIONS):
        return (
            f"{type(conv).__name__}: scale into its {conv.kernel_num} candidates, shift into bias"
        )
    return f"static {type(conv).__name__}: scale into its weight, shift into bias"


def _why_not(conv: nn.Module, bn: _BatchNorm, uses: Counter) -> str:
    """Why ``bn`` cannot be folded into ``conv`` (which directly precedes it), or ``""``."""
    if type(conv) not in (*KR_CONVOLUTIONS, *STATIC_CONVOLUTIONS):
        return f"follows {type(conv).__name__}, not a KR or static convolution"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): normalises every batch"
    if bn.num_features != conv.out_channels:
        return f"{bn.num_features} features after {conv.out_channels} output channels"
    if uses[id(conv)] > 1 or uses[id(bn)] > 1:
        return "the convolution or the BatchNorm is registered more than once in the model"
    if any(uses[id(p)] > 1 for p in conv.parameters(recurse=False)):
        return "the convolution shares its weight or bias with another module"
    if conv._forward_hooks or bn._forward_hooks or bn._forward_pre_hooks:
        return "has forward hooks (they would see other values)"
    if not conv.weight.is_floating_point():
        return f"weight of dtype {conv.weight.dtype}"
    return ""


class _LeafTracer(fx.Tracer):
    """KR layers, ``torch.nn`` layers and modules with hooks are single nodes; a hooked module
    is traced on its own (its hooks may change what flows in and out of it)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_kr_part(m):
            return True
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _find_pairs(
    module: nn.Module, prefix: str, pairs: dict[str, str], reasons: dict[str, str], notes: list[str]
) -> None:
    """Record ``pairs[bn] = conv`` (qualified names) for every BatchNorm of ``module`` whose input
    is exactly a convolution's output, and ``reasons[bn]`` for the others it sees."""
    from lightning_kr.kr_model import KRModel

    if _is_kr_part(module):
        _leave_inside(module, prefix.rstrip("."), reasons)
        return
    if isinstance(module, KRModel) or _is_bn(module):
        graph = None  # KRModel: the chain lives outside the data flow
    else:
        tracer = _LeafTracer()
        try:
            graph = tracer.trace(module)
        except Exception as error:  # any tracing failure: trace the children one by one
            graph = None
            if any(_is_bn(m) for m in module.modules()):
                first_line = (str(error).strip().splitlines() or [""])[0][:120]
                notes.append(
                    f"{prefix or 'model'} ({type(module).__name__}): torch.fx could not trace it "
                    f"({type(error).__name__}: {first_line}); its children were traced one by one"
                )
    if graph is None:
        for name, child in module.named_children():
            _find_pairs(child, f"{prefix}{name}.", pairs, reasons, notes)
        return
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = module.get_submodule(node.target)
        qualified = f"{prefix}{node.target}"
        if not _is_bn(target):
            if _is_kr_part(target):
                _leave_inside(target, qualified, reasons)
            elif tracer.is_leaf_module(target, node.target) and not fx.Tracer.is_leaf_module(
                tracer, target, node.target
            ):  # a leaf for its hooks: its inside is traced on its own
                _find_pairs(target, f"{qualified}.", pairs, reasons, notes)
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            reasons[qualified] = f"its input is not a module's output ({_origin(source)})"
        elif len(source.users) != 1:
            reasons[qualified] = f"the output of {prefix}{source.target} is also used elsewhere"
        elif calls[node.target] > 1 or calls[source.target] > 1:
            reasons[qualified] = f"{qualified} or {prefix}{source.target} is called more than once"
        else:
            pairs[qualified] = f"{prefix}{source.target}"


def _origin(source: object) -> str:
    if isinstance(source, fx.Node):
        return f"{source.op} {getattr(source.target, '__name__', source.target)}"
    return type(source).__name__
