"""``kr_convert``: turn any model (torchvision or not) into a KR model, without editing its code.

How layers are found: one probe forward pass (training mode, ``no_grad``, BatchNorm statistics and the
RNG restored afterwards) records which ``Conv2d`` / ``Linear`` / ``MultiheadAttention`` modules are
*called*, in which order, and with which batch size. That is what makes the conversion right for any
``forward``:

* the first layer executed is the stem / patch embedding and stays static (the paper);
* the last ``Conv2d`` / ``Linear`` executed is the classifier: it stays static and becomes the
  feature branch of the joint head, with the number of classes read from the model's output;
* a module that is never called (its weights are read by its parent, as in Swin's attention) or
  whose input does not carry the batch on its first dimension is left static;
* ``nn.MultiheadAttention`` used as self-attention becomes :class:`KRMultiheadAttention`.

Targeting (as in PEFT): ``include`` / ``exclude`` as a string is a full regular expression on the
qualified module name; as a list, each entry matches a name exactly or as a dotted suffix. Exclusion
wins. ``filter_fn(name, module)`` has the last word. Converting nothing is an error.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_kr.config import KRConfig, Mode
from lightning_kr.kr_model import KRModel, _set_submodule, count_parameters
from lightning_kr.layers.kr_conv2d import KRConv2d
from lightning_kr.layers.kr_linear import KRLinear
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.report import ConversionReport, LayerDecision

Target = str | Sequence[str] | None

UNSUPPORTED = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _matches(name: str, target: Target) -> bool:
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _plain_forward(module: nn.Module) -> bool:
    """The module computes exactly what its torch base class computes (no overridden forward)."""
    if isinstance(module, nn.Conv2d):
        return (
            type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward
        )
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.MultiheadAttention):
        return type(module).forward is nn.MultiheadAttention.forward
    return False


@dataclass
class _Probe:
    """What one forward pass showed about the model's layers."""

    order: list[str] = field(default_factory=list)  # first call order of Conv2d/Linear/MHA
    batch_ok: dict[str, bool] = field(default_factory=dict)
    self_attention: dict[str, bool] = field(default_factory=dict)
    num_classes: int = 0
    mode: str = "train"  # the mode the probe pass ran in
    fallback_reason: str | None = None  # why the training-mode pass failed, if it did


def _probe(model: nn.Module, example: Tensor, names: dict[nn.Module, str]) -> _Probe:
    probe = _Probe()
    batch = example.shape[0]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = names[module]
        inputs = list(args) + list(kwargs.values())
        first = next((a for a in inputs if isinstance(a, Tensor)), None)
        if name not in probe.batch_ok:
            probe.order.append(name)
            probe.batch_ok[name] = True
        if isinstance(module, nn.MultiheadAttention):
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            same = query is key and key is value
            probe.self_attention[name] = probe.self_attention.get(name, True) and same
            batch_dim = 0 if module.batch_first else 1
            ok = query is not None and query.dim() == 3 and query.shape[batch_dim] == batch
        else:
            ok = first is not None and first.dim() >= 2 and first.shape[0] == batch
        probe.batch_ok[name] = probe.batch_ok[name] and ok

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in names
        if isinstance(m, nn.Conv2d | nn.Linear | nn.MultiheadAttention)
    ]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                model.train()
                out = model(example)
            except Exception as train_error:
                # Some models cannot run a training-mode step on a tiny batch; eval mode still shows
                # every layer that runs at inference (not those that run only in training).
                probe.mode = "eval"
                probe.fallback_reason = f"{type(train_error).__name__}: {train_error}"
                warnings.warn(
                    "kr_convert's probe pass failed in training mode "
                    f"({probe.fallback_reason}) and ran in eval mode instead: layers that run only "
                    "in training (auxiliary heads) are not converted. Pass example_input= with "
                    "images the model can train on (e.g. a larger batch) to probe in training mode.",
                    stacklevel=3,
                )
                probe.order.clear()
                probe.batch_ok.clear()
                probe.self_attention.clear()
                model.eval()
                try:
                    out = model(example)
                except Exception as error:
                    raise ValueError(
                        f"kr_convert's probe pass failed on an input of shape {tuple(example.shape)}: "
                        f"{error}. Pass example_input= (or input_size=) with images this model accepts."
                    ) from error
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    logits = out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            "kr_convert needs a classifier whose forward returns logits of shape (B, K) (or a tuple "
            f"whose first item is), got {type(out).__name__}"
            + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else "")
        )
    probe.num_classes = logits.shape[-1]
    return probe


def _example_input(
    model: nn.Module,
    example_input: Tensor | None,
    input_size: int | tuple[int, int] | None,
    in_channels: int,
) -> Tensor:
    if example_input is not None:
        if example_input.dim() != 4:
            raise ValueError(
                f"example_input must be a batch of images (B, C, H, W); got {tuple(example_input.shape)}"
            )
        return example_input
    if input_size is None:
        input_size = (
            getattr(model, "image_size", None)
            or getattr(model, "transform_input_size", None)
            or 224
        )
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    reference = next(model.parameters())
    return torch.randn(2, in_channels, h, w, device=reference.device, dtype=reference.dtype)


def kr_convert(
    model: nn.Module,
    *,
    kernel_num: int = 1,
    reduction: float = 1 / 16,
    min_hidden: int = 16,
    repr_dim: int = 32,
    mode: Mode = "kr",
    attentions: Sequence[str] | None = None,
    fft_size: int = 4,
    preserve_function: bool = True,
    attention_norm: bool = True,
    init_noise: float = 0.1,
    strategy: str = "auto",
    include: Target = None,
    exclude: Target = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    example_input: Tensor | None = None,
    input_size: int | tuple[int, int] | None = None,
    in_channels: int = 3,
    inplace: bool = False,
) -> KRModel:
    """Convert ``model`` into a :class:`KRModel`.

    Every ``Conv2d`` and ``Linear`` (and self-attention ``MultiheadAttention``) becomes a KR layer,
    except the first layer executed (stem / patch embedding) and the final classifier, which stays as
    the feature branch of the joint head. The candidate kernels start from the static weights.

    Args:
        model: an image classifier returning logits (B, K) (or a tuple whose first item is).
        kernel_num: candidate kernels per layer ``n`` (1 = "1x", 4 = "4x").
        reduction, min_hidden: attention hidden width ``max(C_in · reduction, min_hidden)``.
        repr_dim: size ``D`` of the kernel representation.
        mode: ``"kr"`` (default), ``"odconv"`` (ablation: no ``d``) or ``"dyconv"`` (ablation: no
            ``d``, kernel-number attention only).
        attentions: override the attentions of ``mode``, a subset of
            ``("channel", "filter", "spatial", "kernel")``.
        fft_size: ``f`` of the FFT stem (lowest ``f × f`` frequencies).
        preserve_function: start as the static model (default): neutral attentions (gates
            ``2·sigmoid`` of zero-initialised logits, uniform kernel-number attention) and a zero KR
            head, so the converted model computes the original function at initialisation (up to
            float rounding) and trains from scratch at least as fast as it. False: ODConv's
            initialisation (random attention heads, sigmoid gates in (0, 1), random KR head).
        attention_norm: LayerNorm on the attention branch's hidden vector (ODConv's BatchNorm, made
            per sample so batch size 1 trains) and a ``1/√hidden`` read-out of the attention logits
            (default). False: the unnormalised branch. See :class:`~lightning_kr.KernelGenerator`.
        init_noise: relative size of the zero-mean perturbation that makes the candidates differ.
        strategy: per-sample kernel strategy of the KR convolutions (``"auto"``: by shape).
        include, exclude: which modules to consider (string: full regex; list: exact-or-suffix).
        filter_fn: ``(qualified_name, module) -> bool``, applied last.
        example_input: images (B, C, H, W) for the probe pass (default: two random images of
            ``input_size``, or the model's ``image_size``, or 224).
        input_size: side (or ``(H, W)``) of the probe images when ``example_input`` is not given.
        in_channels: image channels (for the probe and the FFT stem).
        inplace: convert ``model`` itself instead of a copy.

    Returns:
        The :class:`KRModel`; ``model.report`` holds the :class:`ConversionReport`.

    Example::

        >>> from torchvision.models import resnet18
        >>> model = kr_convert(resnet18(), kernel_num=4)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1000])
    """
    config = KRConfig(
        kernel_num=kernel_num,
        reduction=reduction,
        min_hidden=min_hidden,
        repr_dim=repr_dim,
        mode=mode,
        attentions=tuple(attentions) if attentions is not None else None,
        fft_size=fft_size,
        preserve_function=preserve_function,
        attention_norm=attention_norm,
        init_noise=init_noise,
        strategy=strategy,
    )
    if isinstance(model, KRModel):
        raise ValueError("this model is already a KRModel; convert the original architecture")
    if not inplace:
        model = copy.deepcopy(model)
    params_before = count_parameters(model)

    names = {m: n for n, m in model.named_modules() if n}
    example = _example_input(model, example_input, input_size, in_channels)
    in_channels = example.shape[1]
    probe = _probe(model, example, names)

    executed_layers = [
        n for n in probe.order if isinstance(model.get_submodule(n), nn.Conv2d | nn.Linear)
    ]
    first = executed_layers[0] if executed_layers else None
    classifier = executed_layers[-1] if executed_layers else None
    inside_mha = {
        f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    }

    decisions: list[LayerDecision] = []
    to_replace: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name:
            continue
        explicit = _matches(name, include)
        kind = type(module).__name__
        if isinstance(module, UNSUPPORTED) or (
            isinstance(module, nn.Conv2d | nn.Linear | nn.MultiheadAttention)
            and not _plain_forward(module)
        ):
            reason = (
                "KR layers replace 2-D convolutions and linear layers only"
                if isinstance(module, UNSUPPORTED)
                else "subclass with its own forward: replacing it would change what it computes"
            )
            if explicit:
                raise ValueError(
                    f"cannot convert '{name}' ({kind}): {reason}; remove it from include"
                )
            decisions.append(
                LayerDecision(
                    name,
                    kind,
                    "skipped",
                    reason,
                    count_parameters(module),
                    count_parameters(module),
                )
            )
            continue
        if not isinstance(module, nn.Conv2d | nn.Linear | nn.MultiheadAttention):
            continue
        if name in inside_mha:
            continue  # converted (or kept) together with its MultiheadAttention
        reason = None
        if name == first:
            reason = "first layer (stem / patch embedding) stays static, as in the paper"
        elif name == classifier:
            reason = "final classifier: kept as the feature branch of the joint head"
        elif name not in probe.batch_ok:
            reason = (
                "never called as a module in the probe pass (its parent reads its weights directly)"
            )
        elif not probe.batch_ok[name]:
            reason = "its input does not carry the batch on its first dimension (the model reshapes the batch)"
        elif isinstance(module, nn.MultiheadAttention) and (
            not probe.self_attention.get(name, False)
            or not module._qkv_same_embed_dim
            or module.bias_k is not None
            or module.add_zero_attn
        ):
            reason = "MultiheadAttention that is not plain self-attention (query is key is value)"
        if reason is None and include is not None and not explicit:
            reason = "not matched by include"
        if reason is None and _matches(name, exclude):
            reason = "matched by exclude"
        if reason is None and filter_fn is not None and not filter_fn(name, module):
            reason = "filter_fn returned False"
        if reason is not None:
            n_params = count_parameters(module)
            decisions.append(LayerDecision(name, kind, "skipped", reason, n_params, n_params))
            continue
        to_replace.append((name, module))

    if not to_replace:
        raise ValueError(
            "kr_convert matched no layer to convert "
            f"(include={include!r}, exclude={exclude!r}, filter_fn={'set' if filter_fn else None}). "
            "Candidates were: "
            + ", ".join(d.name for d in decisions if d.kind in ("Conv2d", "Linear"))[:500]
        )

    layer_options = config.layer_options()
    for name, module in to_replace:
        if isinstance(module, nn.MultiheadAttention):
            new = KRMultiheadAttention.from_mha(module, init_noise=init_noise, **layer_options)
        elif isinstance(module, nn.Conv2d):
            new = KRConv2d.from_conv(
                module, init_noise=init_noise, strategy=strategy, **layer_options
            )
        else:
            new = KRLinear.from_linear(module, init_noise=init_noise, **layer_options)
        _set_submodule(model, name, new)
        decisions.append(
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
    decisions.sort(key=lambda d: order.get(d.name, len(order)))
    report = ConversionReport(
        decisions=decisions,
        params_before=params_before,
        first_layer=first,
        classifier=classifier,
        probe_mode=probe.mode,
        probe_fallback_reason=probe.fallback_reason,
    )
    kr_model = KRModel(model, config, probe.num_classes, in_channels, report)
    kr_model.to(dtype=example.dtype)
    report.params_after = count_parameters(kr_model)
    return kr_model
