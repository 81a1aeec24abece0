"""``KRModel``: image → FFT stem (d_0) → converted backbone (KR layers thread d) → joint head."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_kr.config import RUNTIME_OPTIONS, KRConfig
from lightning_kr.conversion.plan import ConversionPlan
from lightning_kr.hub import PretrainedMixin
from lightning_kr.layers.fft_stem import FFTStem
from lightning_kr.layers.joint_head import JointHead
from lightning_kr.layers.kr_layer import KRLayer
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.layers.kr_window_attention import KRShiftedWindowAttention
from lightning_kr.layers.repr_chain import BatchLayout, ReprChain, rows_to_samples
from lightning_kr.outputs import main_logits
from lightning_kr.report import ConversionReport

FORMAT_VERSION = 1
KR_MODULES = (KRLayer, KRMultiheadAttention, KRShiftedWindowAttention)
"""Modules that :meth:`KRModel.to_static` turns back into their static originals."""


class StemHook:
    """Forward pre-hook on the module whose input is the images the backbone sees: computes
    ``d_0 = stem(images)`` and starts the chain's run with it.

    ``rows``: the module sees ``k`` rows per sample, laid out as ``layout`` (optical flow's two
    frames stacked on the batch): the ``k`` representations of each sample are averaged into one
    ``d_0`` (B, D).
    """

    def __init__(
        self, stem: FFTStem, chain: ReprChain, rows: int = 1, layout: BatchLayout = "batch"
    ) -> None:
        self.stem = stem
        self.chain = chain
        self.rows = rows
        self.layout = layout

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.chain.pending:
            images = args[0]
            d0 = rows_to_samples(self.stem(images), images.shape[0] // self.rows, self.layout)
            self.chain.start(d0)
        elif self.chain.recomputing:
            # A non-reentrant checkpoint recomputes the block holding the first layer: the stem
            # ran inside it, so it runs again (its result was recorded by the layers that read it).
            self.stem(args[0])


class KRModel(nn.Module, PretrainedMixin):
    """A model converted by :func:`~lightning_kr.kr_convert`.

    ``forward(*args)`` runs the backbone with the original model's arguments. When the backbone's
    first layer (or, for models whose first layer is not a convolution, the backbone itself) is
    called, ``d_0 = stem(its input images)`` opens the ``d`` chain — for detection models, the
    normalised, batched images after torchvision's transform; then the KR layers pass ``d`` along
    in execution order, and for a classifier the output is ``head(backbone logits, d_last)``.
    Models whose output is not class logits (segmentation maps, detection losses, flows) have no
    joint head and return the backbone's output. In the ODConv / DyConv ablations there is no ``d``:
    no stem, no head.

    Save and share it as PEFT does: :meth:`save_pretrained` writes ``kr_config.json`` and
    ``model.safetensors`` into a folder, :meth:`from_pretrained` builds it again from that folder
    (or, with the ``[hub]`` extra, a Hugging Face Hub id; :meth:`push_to_hub` uploads it), and
    :meth:`unload` returns the plain base model.

    Attributes:
        backbone: the original model with its layers replaced in place.
        stem: :class:`FFTStem` or ``None``.
        head: :class:`JointHead` or ``None``.
        config: the :class:`KRConfig` it was converted with.
        report: the :class:`ConversionReport` of the conversion.
        num_classes: ``K`` of a classifier, else ``None``.
        plan: the :class:`~lightning_kr.conversion.plan.ConversionPlan` it was built from.
        builder: how :func:`~lightning_kr.models.build_model` built the base model, if it did.

    Shapes: whatever the backbone takes → whatever it returns, with the KR branch added to its
    logits (B, K) when it returns logits.
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: KRConfig,
        report: ConversionReport,
        *,
        num_classes: int | None,
        stem_input_shape: tuple[int, ...] = (3, 224, 224),
        stem_on: str = "",
        stem_rows: int = 1,
        stem_layout: BatchLayout = "batch",
    ) -> None:
        """
        Args:
            backbone: the model with its layers replaced.
            config: the conversion options.
            report: what the conversion did.
            num_classes: ``K`` when the backbone returns class logits (a joint head is added).
            stem_input_shape: ``(C, H, W)`` images or ``(C, T, H, W)`` videos the stem will see
                (one sample's shape; the sizes only set the number of temporal frequencies).
            stem_on: the backbone submodule whose input the stem reads (``""``: the backbone's).
            stem_rows, stem_layout: that input holds ``k`` rows per sample in this layout.
        """
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes
        self.in_channels = stem_input_shape[0]
        self.report = report
        self.stem_on = stem_on
        self.plan: ConversionPlan | None = None
        self.builder: dict[str, Any] | None = None
        self.chain = ReprChain()
        self.stem: FFTStem | None = None
        self.head: JointHead | None = None
        if config.uses_repr:
            self.stem = FFTStem(
                self.in_channels,
                config.repr_dim,
                config.fft_size,
                time_freq=stem_time_frequencies(stem_input_shape, config.fft_size),
            )
            if num_classes is not None:
                self.head = JointHead(
                    config.repr_dim, num_classes, zero_init=config.preserve_function
                )
            entry = backbone.get_submodule(stem_on)
            entry.register_forward_pre_hook(StemHook(self.stem, self.chain, stem_rows, stem_layout))
        for name, layer in self.kr_layers():
            layer.attach(self.chain, name)
        reference = next(backbone.parameters(), None)
        if reference is not None:
            self.to(device=reference.device)

    def kr_layers(self) -> Iterator[tuple[str, KRLayer]]:
        """``(qualified name in the backbone, layer)`` for every KR layer, in module order."""
        for name, module in self.backbone.named_modules():
            if isinstance(module, KRLayer):
                yield name, module

    def set_temperature(self, value: float) -> None:
        """Set the attention temperature ``T`` of every KR layer (annealed 30 → 1 by ODConv)."""
        for _, layer in self.kr_layers():
            layer.set_temperature(value)

    @property
    def temperature(self) -> float:
        for _, layer in self.kr_layers():
            return float(layer.generator.temperature)
        return 1.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.stem is None:
            return self.backbone(*args, **kwargs)
        with self.chain.run() as run:
            out = self.backbone(*args, **kwargs)
            if self.head is None:
                return run.settle(out)
            d_last = run.read("joint head", main_logits(out).shape[0], training=self.training)
        return self.head(out, d_last)

    def to_static(self) -> nn.Module:
        """The architecture before conversion: a copy of the backbone with static layers again
        (each KR layer replaced by its static layer, the mean candidate; no stem, no joint head).
        :meth:`unload` is the same call under PEFT's name."""
        static = copy.deepcopy(self.backbone)
        for module in static.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, StemHook):
                    del module._forward_pre_hooks[key]
        replaced: list[str] = []
        for name, module in list(static.named_modules()):
            inside = any(name.startswith(f"{r}.") for r in replaced)
            if name and not inside and isinstance(module, KR_MODULES):
                static.set_submodule(name, module.to_static())
                replaced.append(name)
        return static

    def unload(self) -> nn.Module:
        """PEFT's name for :meth:`to_static`: the plain base model back (a copy; this model is left
        as it is)."""
        return self.to_static()

    # A checkpoint records the conversion options; loading into a model converted with other
    # architecture options fails with an error that names them (runtime-only options may differ:
    # the loading model keeps its own).
    def get_extra_state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.as_record(),
            "converted": sorted(name for name, _ in self.kr_layers()),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "config" not in state:
            return
        mine = self.get_extra_state()
        # Options added after a checkpoint was written: the value its version used.
        theirs = KRConfig.from_record(dict(state["config"])).as_record()
        differing = {
            key: (theirs.get(key), value)
            for key, value in mine["config"].items()
            if key not in RUNTIME_OPTIONS and theirs.get(key) != value
        }
        if differing:
            details = ", ".join(
                f"{k}: checkpoint={a!r}, this model={b!r}" for k, (a, b) in differing.items()
            )
            raise RuntimeError(
                f"this state_dict was saved from a model converted with other KR options ({details}). "
                "Convert the model with the checkpoint's options: kr_convert(arch(), **options)."
            )
        if state.get("converted") != mine["converted"]:
            theirs, ours = set(state.get("converted", [])), set(mine["converted"])
            raise RuntimeError(
                "this state_dict was saved from a model with other layers converted "
                f"(only in checkpoint: {sorted(theirs - ours)[:5]}, only here: "
                f"{sorted(ours - theirs)[:5]}); use the same include/exclude/filter_fn"
            )


def stem_time_frequencies(stem_input_shape: tuple[int, ...], fft_size: int) -> int:
    """Temporal frequencies of the stem: 0 for images (C, H, W); for videos (C, T, H, W) as many as
    ``T`` frames resolve, up to ``fft_size``."""
    if len(stem_input_shape) == 3:
        return 0
    if len(stem_input_shape) == 4:
        return max(1, min(fft_size, (stem_input_shape[1] + 1) // 2))
    raise ValueError(
        "the d_0 stem reads images (B, C, H, W) or videos (B, C, T, H, W); the model's first layer "
        f"sees inputs of shape (B, {', '.join(map(str, stem_input_shape))}). Use mode='odconv' "
        "(no kernel representation) for other inputs."
    )


def find_kr_models(module: nn.Module) -> list[tuple[str, KRModel]]:
    """The outermost :class:`KRModel` submodules of ``module`` (``""`` if ``module`` is one)."""
    found: list[tuple[str, KRModel]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, KRModel) and not any(
            name.startswith(f"{n}.") or not n for n, _ in found
        ):
            found.append((name, sub))
    return found


def parameter_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)
