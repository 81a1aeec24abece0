"""The KR math of one layer: Representation Fusion, Kernel Generator and Kernel Representation Generator.

Read against the poster (``shared/seeds/kernel_representation_poster.txt``) and ``KR_SPEC.md``::

    h_i      = GAP(X_i)                                  (computed by the layer, passed in as ``h``)
    h~_i     = F(cat[d_i, h_i])                          Representation Fusion (RF)
    alpha_i  = S(h~_i)                                   Kernel Generator (KG): ODConv's four attentions
    d_{i+1}  = K(cat[h~_i, alpha~_i])                    Kernel Representation Generator (KRG)

Choices the poster leaves open, fixed here:

* ``F`` is one linear layer, a LayerNorm (no affine) and a ReLU: ODConv's ``fc → BatchNorm → relu``
  with ``d`` concatenated to its input and the BatchNorm replaced by a per-sample normalisation, so
  batch size 1 trains and evaluates alike (``normalize=False``: ``fc → relu``, no normalisation).
* ``alpha~_i`` (the "compact summary of the generated attentions") is, by default (``summary="pooled"``),
  ``[pool(a_c), pool(a_f), a_s, a_kn]`` where ``pool`` averages a channel or filter attention vector
  into at most ``summary_bins`` (8) equal bins: a parameter-free, fixed-size projection, so the KRG
  costs ``O(D · (hidden + 2·bins + k² + n))`` whatever the width of the layer. ``summary="full"``
  concatenates the whole vectors ``[a_c, a_f, a_s, a_kn]`` (a larger ``K`` for wide layers).
* ``K`` is ``Linear → LayerNorm``; the LayerNorm keeps ``d`` on one scale through deep chains.
* Attentions are ``gate_scale · sigmoid(logit / T)`` (kernel-number attention: ``softmax(logit / T)``).
  ``gate_scale = 1`` is ODConv; ``gate_scale = 2`` with zero-initialised attention logits makes every
  attention exactly neutral at initialisation (the default: a converted model starts as the static
  one and its gates can both damp and amplify).
* The logits are read out at ``1/√hidden`` (``normalize=True``): ``logit = head(h~) / √hidden``. With a
  unit-scale ``h~`` this makes a logit move, per optimiser step, at the rate of an ordinary scale
  parameter (a BatchNorm γ) instead of ``hidden`` times faster.

Why these defaults (measured with ``recipes/compare.py``; README "Learning"): with ODConv's
initialisation (random attention heads, sigmoid gates in (0, 1)) and no BatchNorm, the hidden vector
of a converted ResNet-18 at initialisation has a standard deviation of 2–6, a quarter to three
quarters of the spatial gates are saturated, every kernel is scaled by about 1/8 and the candidate
kernels receive 2–20 times the relative gradient of the static weights: trained from scratch it
learned far slower than the static network. Neutral attentions alone are not enough: the attention logits then move
by ``lr · |h~|² · g`` per step, with ``|h~|²`` in the hundreds, and saturate within a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_KINDS = ("channel", "filter", "spatial", "kernel")


@dataclass
class Attentions:
    """The per-sample attentions of one KR layer; ``None`` where that attention is switched off.

    Shapes, for a batch of ``B``: ``channel`` (B, C_in), ``filter`` (B, C_out), ``spatial`` (B, k*k),
    ``kernel`` (B, n). ``repr_out`` is ``d_{i+1}`` (B, D), or ``None`` when the layer keeps no
    representation (ODConv / DyConv ablations).
    """

    channel: Tensor | None
    filter: Tensor | None
    spatial: Tensor | None
    kernel: Tensor | None
    repr_out: Tensor | None


def attention_hidden_size(in_features: int, reduction: float, min_hidden: int) -> int:
    """ODConv's hidden width: ``max(int(in_features * reduction), min_hidden)``."""
    return max(int(in_features * reduction), min_hidden)


class KernelGenerator(nn.Module):
    """RF + KG + KRG for one layer.

    Args:
        in_channels: ``C_in`` of the layer (length of ``h``).
        out_channels: ``C_out`` of the layer.
        kernel_area: ``k*k`` for a convolution, 1 for a linear layer.
        kernel_num: number of candidate kernels ``n``.
        repr_dim: size ``D`` of the kernel representation; 0 switches the representation off
            (fusion sees only ``h``: ODConv / DyConv).
        reduction: hidden width as a fraction of ``C_in`` (ODConv: 1/16).
        min_hidden: floor of the hidden width (ODConv: 16).
        attentions: which of ``channel``, ``filter``, ``spatial``, ``kernel`` to generate. Spatial is
            dropped for ``kernel_area == 1``, kernel-number for ``kernel_num == 1`` and filter for
            depthwise layers, as in ODConv.
        depthwise: the layer is depthwise (no filter attention).
        gate_scale: 2 (default: neutral ``2·sigmoid(0) = 1`` at initialisation) or 1 (ODConv's sigmoid).
        zero_init: initialise the attention logits at zero (default: neutral attentions); False:
            ODConv's Kaiming-normal heads.
        normalize: LayerNorm on the fused hidden vector and a ``1/√hidden`` read-out of the logits
            (default); False: ODConv's unnormalised ``fc → relu`` (whose BatchNorm is left out).

    Shapes: ``h`` (B, C_in), ``d`` (B, D) or ``None`` → :class:`Attentions`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_area: int,
        kernel_num: int = 1,
        repr_dim: int = 32,
        reduction: float = 1 / 16,
        min_hidden: int = 16,
        attentions: tuple[str, ...] = ATTENTION_KINDS,
        depthwise: bool = False,
        gate_scale: float = 2.0,
        zero_init: bool = True,
        normalize: bool = True,
        summary: str = "pooled",
        summary_bins: int = 8,
    ) -> None:
        super().__init__()
        if summary not in ("pooled", "full"):
            raise ValueError(f"summary must be 'pooled' or 'full'; got {summary!r}")
        unknown = set(attentions) - set(ATTENTION_KINDS)
        if unknown:
            raise ValueError(
                f"unknown attention kinds {sorted(unknown)}; choose from {ATTENTION_KINDS}"
            )
        if kernel_num > 1 and "kernel" not in attentions:
            raise ValueError(
                f"kernel_num={kernel_num} candidates need the kernel-number attention to mix them: "
                f"add 'kernel' to attentions {tuple(attentions)} or set kernel_num=1"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_area = kernel_area
        self.kernel_num = kernel_num
        self.repr_dim = repr_dim
        self.gate_scale = gate_scale
        self.hidden = attention_hidden_size(in_channels, reduction, min_hidden)
        self.register_buffer("temperature", torch.tensor(1.0), persistent=True)

        self.fuse = nn.Linear(repr_dim + in_channels, self.hidden)
        # Per-sample stand-in for ODConv's BatchNorm; no parameters, so state dicts are unchanged.
        self.norm = nn.LayerNorm(self.hidden, elementwise_affine=False) if normalize else None
        self.readout = self.hidden**-0.5 if normalize else 1.0
        sizes = {
            "channel": in_channels,
            "filter": 0 if depthwise else out_channels,
            "spatial": kernel_area if kernel_area > 1 else 0,
            "kernel": kernel_num if kernel_num > 1 else 0,
        }
        self.heads = nn.ModuleDict(
            {
                kind: nn.Linear(self.hidden, sizes[kind])
                for kind in ATTENTION_KINDS
                if kind in attentions and sizes[kind] > 0
            }
        )
        self.summary = summary
        self.summary_bins = summary_bins
        summary_size = sum(
            self._summary_size(kind, h.out_features) for kind, h in self.heads.items()
        )
        self.represent = (
            nn.Sequential(nn.Linear(self.hidden + summary_size, repr_dim), nn.LayerNorm(repr_dim))
            if repr_dim > 0
            else None
        )
        self.reset_parameters(zero_init)

    def reset_parameters(self, zero_init: bool = False) -> None:
        nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fuse.bias)
        for head in self.heads.values():
            if zero_init:
                nn.init.zeros_(head.weight)
            else:
                nn.init.kaiming_normal_(head.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(head.bias)

    def _summary_size(self, kind: str, size: int) -> int:
        if self.summary == "pooled" and kind in ("channel", "filter"):
            return min(size, self.summary_bins)
        return size

    def _summarise(self, kind: str, attention: Tensor) -> Tensor:
        """alpha~ for one attention: (B, size) → (B, summary size)."""
        bins = self._summary_size(kind, attention.shape[1])
        if bins == attention.shape[1]:
            return attention
        return F.adaptive_avg_pool1d(attention.unsqueeze(1), bins).squeeze(1)

    @property
    def uses_repr(self) -> bool:
        """Whether the fusion reads ``d`` (it writes ``d_{i+1}`` where :attr:`represent` is set)."""
        return self.repr_dim > 0

    def drop_repr_output(self) -> None:
        """Stop generating ``d_{i+1}`` (the last KR layer of a model without a joint head, whose
        ``d`` nothing reads: its KRG would receive no gradient)."""
        self.represent = None

    def forward(self, h: Tensor, d: Tensor | None) -> Attentions:
        if self.uses_repr:
            if d is None:
                raise ValueError("this KR layer needs a representation d of shape (B, D); got None")
            fused_in = torch.cat([d.to(h.dtype), h], dim=1)
        else:
            fused_in = h
        fused = self.fuse(fused_in)
        if self.norm is not None:
            fused = self.norm(fused)
        fused = F.relu(fused)
        # All heads as one matrix product, one temperature division and one sigmoid (a batch-1
        # forward is bound by the number of small operators); the heads stay separate parameters.
        heads = list(self.heads.values())
        if heads:
            logits = F.linear(
                fused,
                torch.cat([head.weight for head in heads]) if len(heads) > 1 else heads[0].weight,
                torch.cat([head.bias for head in heads]) if len(heads) > 1 else heads[0].bias,
            ) * (self.readout / self.temperature)
        else:  # e.g. DyConv at n = 1: no attention at all, the layer is its static convolution
            logits = fused.new_zeros(fused.shape[0], 0)
        kinds = list(self.heads.keys())
        sizes = [head.out_features for head in heads]
        gated = sum(size for kind, size in zip(kinds, sizes, strict=True) if kind != "kernel")
        values: list[Tensor] = []
        if gated:
            gates = torch.sigmoid(logits[:, :gated])
            if self.gate_scale != 1.0:
                gates = gates * self.gate_scale
            values.extend(gates.split(sizes[: len(sizes) - ("kernel" in self.heads)], dim=1))
        if "kernel" in self.heads:  # always the last head
            values.append(torch.softmax(logits[:, gated:], dim=1))
        out: dict[str, Tensor] = dict(zip(kinds, values, strict=True))
        repr_out = None
        if self.represent is not None:
            summaries = [self._summarise(kind, attention) for kind, attention in out.items()]
            repr_out = self.represent(torch.cat([fused, *summaries], dim=1))
        return Attentions(
            channel=out.get("channel"),
            filter=out.get("filter"),
            spatial=out.get("spatial"),
            kernel=out.get("kernel"),
            repr_out=repr_out,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, repr_dim={self.repr_dim}, kernel_num={self.kernel_num}, "
            f"attentions={tuple(self.heads.keys())}, gate_scale={self.gate_scale}, "
            f"normalize={self.norm is not None}"
        )
