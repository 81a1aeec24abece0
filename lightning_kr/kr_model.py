"""``KRModel``: image → FFT stem (d_0) → converted backbone (KR layers thread d) → joint head."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kr.config import RUNTIME_OPTIONS, KRConfig
from lightning_kr.layers.fft_stem import FFTStem
from lightning_kr.layers.joint_head import JointHead
from lightning_kr.layers.kr_layer import KRLayer
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.layers.repr_chain import ReprChain
from lightning_kr.report import ConversionReport

FORMAT_VERSION = 1


class KRModel(nn.Module):
    """A model converted by :func:`~lightning_kr.kr_convert`.

    ``forward(x)`` computes ``d_0 = stem(x)``, runs the backbone while its KR layers pass ``d`` along
    in execution order, and returns ``head(backbone logits, d_last)``. In the ODConv / DyConv
    ablations there is no ``d``: no stem, no head, the backbone's output is returned as is.

    Attributes:
        backbone: the original model with its layers replaced in place.
        stem: :class:`FFTStem` or ``None``.
        head: :class:`JointHead` or ``None``.
        config: the :class:`KRConfig` it was converted with.
        report: the :class:`ConversionReport` of the conversion.

    Shapes: images (B, C, H, W) → whatever the backbone returns, with the KR branch added to its
    logits (B, K).
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: KRConfig,
        num_classes: int,
        in_channels: int,
        report: ConversionReport,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.report = report
        if config.uses_repr:
            self.stem = FFTStem(in_channels, config.repr_dim, config.fft_size)
            self.head = JointHead(config.repr_dim, num_classes, zero_init=config.preserve_function)
        else:
            self.stem = None
            self.head = None
        self.chain = ReprChain()
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

    def forward(self, x: Tensor) -> Any:
        if self.stem is None:
            return self.backbone(x)
        d0 = self.stem(x)
        with self.chain.run(d0) as run:
            out = self.backbone(x)
            d_last = run.read("joint head", d0.shape[0])
        return self.head(out, d_last)

    def to_static(self) -> nn.Module:
        """The architecture before conversion: a copy of the backbone with static layers again."""
        static = copy.deepcopy(self.backbone)
        for name, module in list(static.named_modules()):
            if isinstance(module, KRLayer | KRMultiheadAttention):
                _set_submodule(static, name, module.to_static())
        return static

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
        differing = {
            key: (state["config"].get(key), value)
            for key, value in mine["config"].items()
            if key not in RUNTIME_OPTIONS and state["config"].get(key) != value
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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)
