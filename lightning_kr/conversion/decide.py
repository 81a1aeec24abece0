"""Step 2 of ``kr_convert``: for each module, from what the probe saw, convert it or say why not.

:func:`decide` is a pure function: a module, what the probe recorded and the user's targets in; a
reason to keep it static (or ``None``: convert) out. The rules, in order:

* a type without a KR version, or a subclass with its own ``forward`` (replacing it would change
  what it computes), stays static;
* the first layer that runs (stem / patch embedding) stays static, as in the paper;
* a classifier's final layer stays static: it is the feature branch of the joint head;
* a module never called as a module (its parent reads its weights) stays static;
* a module whose input does not carry the batch on its first dimension stays static; one that sees
  ``k·B`` rows in a fixed layout (optical flow's two frames stacked, MViT's heads) is converted
  and gives each row its sample's ``d``; one that sees ``k·B`` rows in no fixed layout (detection
  proposals) stays static;
* ``MultiheadAttention`` that is not plain self-attention stays static;
* then the targets (as in PEFT): ``include`` (if given) must match, ``exclude`` must not, and
  ``filter_fn`` has the last word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_kr.conversion.create import STATIC_TYPES, base_type, computes_like_base
from lightning_kr.conversion.probe import LayerCalls, Probe
from lightning_kr.conversion.targets import Target, matches


@dataclass(frozen=True)
class Targets:
    """Which modules the user asks for (see :mod:`lightning_kr.conversion.targets`)."""

    include: Target = None
    exclude: Target = None
    filter_fn: Callable[[str, nn.Module], bool] | None = None


@dataclass(frozen=True)
class Verdict:
    """``reason`` to keep a module static, or ``None`` to convert it; ``unsupported`` when no KR
    layer can replace it at all (naming it in ``include`` is then an error)."""

    reason: str | None
    unsupported: bool = False


CONVERT = Verdict(None)


def decide(
    name: str,
    module: nn.Module,
    calls: LayerCalls | None,
    probe: Probe,
    targets: Targets,
    classifier: str | None,
) -> Verdict:
    """Whether to convert the module ``name`` (see the module docstring for the rules)."""
    base = base_type(module)
    static_reason = next((r for t, r in STATIC_TYPES.items() if isinstance(module, t)), None)
    if static_reason is not None:
        return Verdict(static_reason, unsupported=True)
    if base is None:
        return Verdict(f"no KR version of {type(module).__name__}", unsupported=True)
    if not computes_like_base(module, base):
        return Verdict(
            "subclass with its own forward: replacing it would change what it computes",
            unsupported=True,
        )
    if name == probe.entry:
        return Verdict("first layer (stem / patch embedding) stays static, as in the paper")
    if name == classifier:
        return Verdict("final classifier: kept as the feature branch of the joint head")
    if calls is None:
        return Verdict(
            "never called as a module in the probe pass (its parent reads its weights directly)"
        )
    multiple = probe.batch_multiple(name)
    if multiple is None:
        return Verdict(
            "its input does not carry the batch on its first dimension (the model reshapes the "
            "batch)"
        )
    if calls.layout is None:
        return Verdict(
            f"its rows ({multiple}× the images in the probe pass) are not the samples in a fixed "
            "layout (e.g. detection proposals, whose number per image varies): which image's d a "
            "row takes is not known"
        )
    if isinstance(module, nn.MultiheadAttention) and (
        not calls.self_attention
        or not module._qkv_same_embed_dim
        or module.bias_k is not None
        or module.add_zero_attn
    ):
        return Verdict(
            "MultiheadAttention that is not plain self-attention (query is key is value)"
        )
    if targets.include is not None and not matches(name, targets.include):
        return Verdict("not matched by include")
    if matches(name, targets.exclude):
        return Verdict("matched by exclude")
    if targets.filter_fn is not None and not targets.filter_fn(name, module):
        return Verdict("filter_fn returned False")
    return CONVERT
