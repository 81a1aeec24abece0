"""The KR math of one layer: Representation Fusion, Kernel Generator and Kernel Representation Generator.

Read against the poster and the specification summarised in ``docs/method.md``::

    h_i      = GAP(X_i)                                  (computed by the layer, passed in as ``h``)
    h~_i     = F(cat[d_i, h_i])                          Representation Fusion (RF)
    alpha_i  = S(h~_i)                                   Kernel Generator (KG): ODConv's four attentions
    d_{i+1}  = K(cat[h~_i, alpha~_i])                    Kernel Representation Generator (KRG)

Choices the poster leaves open, fixed here:

* ``F`` is ODConv's ``fc → BatchNorm → relu`` with ``d`` concatenated to its input (``norm="batch"``,
  the default). The BatchNorm standardises every hidden unit *across the samples* of the batch, so
  the hidden vector ``h~`` carries what differs between images rather than what they share, and a
  step of an attention head changes different images' kernels differently. Its ``eps`` is 1
  (``BATCH_NORM_EPS``; ODConv: 1e-5), a variance floor: a unit that barely varies between images
  is not blown up to unit scale, so the gates do not follow amplified noise. A batch of one sample
  (in training too) is normalised with the running statistics, as in eval mode, so batch size 1
  trains and evaluates. ``norm="layer"``: a per-sample LayerNorm (no affine), the earlier default,
  kept for its checkpoints; ``norm="none"``: ``fc → relu``.
* ``alpha~_i`` (the "compact summary of the generated attentions") is, by default (``summary="pooled"``),
  ``[pool(a_c), pool(a_f), a_s, a_kn]`` where ``pool`` averages a channel or filter attention vector
  into at most ``summary_bins`` (8) equal bins: a parameter-free, fixed-size projection, so the KRG
  costs ``O(D · (hidden + 2·bins + k² + n))`` whatever the width of the layer. ``summary="full"``
  concatenates the whole vectors ``[a_c, a_f, a_s, a_kn]`` (a larger ``K`` for wide layers).
* ``K`` is ``Linear → LayerNorm``; the LayerNorm keeps ``d`` on one scale through deep chains.
* Gates are neutral, ``1 + r·tanh(z / 2r)`` of ``z = logit / T`` with ``r = gate_range`` (default 0.75;
  1 is ``2·sigmoid(z)``), or ODConv's ``sigmoid(z)`` (``gate_scale = 1``); the kernel-number attention is
  ``softmax(logit / T)``. Neutral gates with zero-initialised attention logits make every attention
  exactly neutral at initialisation (the default: a converted model starts as the static one and
  its gates can both damp and amplify).
* The logits are read out at 1 after the BatchNorm (or none); after the LayerNorm at
  ``1/√hidden`` (``logit = head(h~) / √hidden``), which kept the attentions static: see below.

Why these defaults (measured with ``recipes/compare.py``, which prints both accuracy and spread;
``docs/learning.md``, "Learning" and "Dynamism"): with ODConv's initialisation (random attention heads, sigmoid gates in
(0, 1)) and no normalisation, a converted ResNet-18 learned far slower than the static network (the
hidden vector had a standard deviation of 2–6, a quarter to three quarters of the spatial gates were
saturated). Neutral attentions (zero heads, ``2·sigmoid``) fixed the learning, and a LayerNorm with
a ``1/√hidden`` read-out kept the logits from saturating — but also kept the layers static: trained,
every image got the same kernel to within 0.03 % (median across-image spread 0.0003). A LayerNorm
normalises each sample on its own, so ``h~`` is dominated by what all images share, and a head's
step moves every image's logits alike; the ``1/√hidden`` read-out slowed the heads a further
``hidden`` times. Standardising across samples removes the shared part and the read-out of 1 lets
the heads learn at the rate of the other weights. With ODConv's ``eps`` of 1e-5 the BatchNorm blew
the tiny across-image variation of some units up to unit scale and the gates followed that noise:
a small CNN (ODConv ablation, 60 steps, 4 seeds) reached a training loss of 0.63 against the static
network's 0.43; with ``eps = 1`` 0.41. Measured on the digits (ResNet-18, 150 steps, 3 seeds):
median across-image spread 0.0003 → 0.034, test top-1 97.8 ± 0.4 (static 98.0 ± 0.1). A larger
read-out (1.4, 2) raised the spread (to 0.21 at 2) but made training unstable (one seed of three
at 71 %); normalising with running statistics only (no batch noise) saturated most gates after a
few large steps.

Making trained layers dynamic (2026-12-02, docs/learning.md, "Dynamism"): from zero heads nothing in the task
asks for sample-specific kernels (trained spread ~0.01), and from random heads training lowers their
spread. Three mechanisms are here: a training-only push keeping each logit's across-batch std above
a floor (:class:`DynamismFloor`, ``dynamism_floor``; on by default, 0.4 at weight 0.02, its weight
warmed up over the first 100 training passes, :meth:`warm_up_dynamism`),
whose gradient reaches only the generator's own weights; bounded gates ``1 + r·tanh(z / 2r)``
(``gate_range``, 0.75 by default), without which pushed gates ran away to their ends in some
seeds; and random heads (:meth:`randomise_heads`, ``KRConfig.dynamic_init``) ramped in from an exact
start (:meth:`ramp_in`, ``dynamic_warmup``). The push first also reached the backbone through
``h = GAP(x)`` and ``d``: it then cost accuracy (−0.5 points at weight 0.05) for a median spread of
0.14; kept to the generator, the same floor gives 0.22–0.26 (KR 1x / 4x) at −0.1 / −1.0 points
(three seeds; over ten, −0.9 / −2.7). In layers of several candidate kernels the push gives way
where it opposes the task's gradient (``dynamism_projection``, see :class:`DynamismFloor`): KR 4x
−0.84 over the same ten seeds, at the same spread (2026-12-03, docs/learning.md, "Dynamism").

Where the fusion has no ``d`` (ODConv, DyConv), the input features ``h`` are amplified to an
across-image scale of at least ``feature_floor`` (0.25; :meth:`KernelGenerator.amplify_features`)
before the fusion. The BatchNorm's variance floor
is absolute, so a layer whose inputs barely vary between images (a transformer's attention and MLP
output projections: across-image std 0.005–0.07) got a hidden vector that did not vary, and
without ``d`` it stayed static however long it trained (a small Swin: attention projections at
spread 1e-6–0.04; with the floor 0.24). With ``d`` the fusion varies whatever ``h`` does, and the
gain (from the first step) saturated gates at a large learning rate, so KR layers are left as
they are. The gain ramps in with the push's warm-up: from the first step it cost the ResNet-18
ODConv ablation a point over ten seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kr.layers.folded_generator import FoldedGenerator, fold, run_folded, source_key
from lightning_kr.strategies import tracing

ATTENTION_KINDS = ("channel", "filter", "spatial", "kernel")
NORMS = ("batch", "layer", "none")
BATCH_NORM_EPS = 1.0
"""The attention branch's BatchNorm adds this to the variance (ODConv: 1e-5): see the module doc."""
GATE_RANGE = 0.75
"""Default ``KRConfig.gate_range``: neutral gates within ``1 ± 0.75`` (see ``_gates``), which keeps
gates pushed towards dynamism from running away; 1 is ``2·sigmoid``, within ``(0, 2)``."""
DYNAMISM_FLOOR = 0.4
"""Default across-batch standard deviation below which training pushes each attention logit up
(``KRConfig.dynamism_floor``; 0: off): see :class:`DynamismFloor` and docs/learning.md, "Dynamism"."""
DYNAMISM_WEIGHT = 0.02
"""Default weight of that push (``KRConfig.dynamism_weight``)."""
FEATURE_FLOOR = 0.25
"""Default ``KRConfig.feature_floor``: the across-image scale the kernel generator's input
features ``h`` are amplified to at least (see :meth:`KernelGenerator.amplify_features`); 0: off."""
FEATURE_MOMENTUM = 0.1
"""Momentum of the running across-image scale of ``h`` (as a BatchNorm's running statistics)."""
DYNAMISM_PROJECTION = "auto"
"""Default ``KRConfig.dynamism_projection``: the push gives way where it opposes the task's
gradient (see :class:`DynamismFloor`) in layers that mix several candidate kernels, and not in
layers with one (``"auto"``; :func:`projects_push`)."""


def projects_push(projection: bool | str, kernel_num: int) -> bool:
    """Whether a generator of ``kernel_num`` candidates projects its push
    (``KRConfig.dynamism_projection``: ``True``, ``False`` or ``"auto"``, which projects where
    ``kernel_num > 1``: measured, the projection mends the 4x layers and costs the 1x ones; see
    docs/learning.md, "Dynamism")."""
    if projection == "auto":
        return kernel_num > 1
    return bool(projection)


DYNAMISM_WARMUP = 100
"""Default number of training passes over which the push's weight ramps in from zero
(``KRConfig.dynamism_warmup``, applied by ``kr_convert``; a layer built on its own pushes at full
weight from its first pass unless :meth:`KernelGenerator.warm_up_dynamism` is called)."""


class DynamismFloor(torch.autograd.Function):
    """The push towards dynamic attentions: identity in the forward pass; the backward pass returns
    the gradient of ``weight · Σ_j max(0, floor − std_b(z_j))`` in place of the gradient it receives:
    every attention logit whose standard deviation across the batch's samples is below ``floor`` is
    pushed to vary more, in the directions of variation it already has.

    With ``project`` (``KRConfig.dynamism_projection``; by default in layers of several candidate
    kernels) the push gives way to the task:
    the gradient received is the task's gradient on the same logits (see below), and for each logit
    column where the push's gradient has a negative dot product with it (over the batch), the push
    loses its component along the task's gradient (PCGrad's projection). What is left never opposes
    the task to first order, and still makes the layer dynamic: a batch's task gradient on a
    logit is one direction among the batch's, so most of the push survives even against a task
    that opposes all variation (a static target; ``tests/test_dynamism_floor.py``).

    Shapes: ``logits`` (B, E) → (B, E). :class:`KernelGenerator` applies it to its logits recomputed
    from detached inputs and adds ``pushed - pushed.detach()`` (zeros) to the real logits, so the
    push reaches the generator's own weights and nothing upstream: the backbone features ``h`` and
    the representation ``d`` receive only the task's gradient; and the zeros, added to the real
    logits, receive the task's gradient on them. Forward values are untouched (the static function
    at step 0, evaluation and export unchanged), in any training loop (no loss term to add, no
    callback). Zero-initialised heads give logits that do not vary at all and receive no push; the
    first steps of the task's own gradient make them vary a little, and the push then grows that
    variation to the floor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, floor: float, weight: Tensor | float, project: bool
    ) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.floor, ctx.weight, ctx.project = floor, weight, project
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        centred = logits - logits.mean(0, keepdim=True)
        std = (centred.square().mean(0, keepdim=True) + 1e-6).sqrt()
        below = (std < ctx.floor).to(logits.dtype)
        # d/dz of -std_j = -(z - mean_j) / (B · std_j)
        push = centred * (below / (logits.shape[0] * std)) * -ctx.weight
        if ctx.project:
            task = grad.to(push.dtype)
            dot = (push * task).sum(0, keepdim=True)
            opposed = dot.clamp(max=0) / task.square().sum(0, keepdim=True).clamp_min(1e-30)
            push = push - opposed * task
        return push, None, None, None


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

    @classmethod
    def of(cls, by_kind: dict[str, Tensor], repr_out: Tensor | None) -> Attentions:
        """The attentions of a mapping from attention kind to tensor (kinds left out: ``None``)."""
        return cls(
            channel=by_kind.get("channel"),
            filter=by_kind.get("filter"),
            spatial=by_kind.get("spatial"),
            kernel=by_kind.get("kernel"),
            repr_out=repr_out,
        )


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
        norm: the norm of the hidden vector, ``"batch"`` (default), ``"layer"`` or ``"none"`` (see
            the module doc).

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
        norm: str = "batch",
        summary: str = "pooled",
        summary_bins: int = 8,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
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
        self.ramp_steps = 0  # see ramp_in
        self.dynamism_warmup = 0  # see warm_up_dynamism
        self.gate_range = GATE_RANGE  # see _gates
        self.dynamism_floor = DYNAMISM_FLOOR  # see DynamismFloor
        self.dynamism_weight = DYNAMISM_WEIGHT
        self.dynamism_projection = projects_push(DYNAMISM_PROJECTION, kernel_num)
        self.feature_floor = 0.0  # see amplify_features
        # The factor the task's loss is multiplied by before backward (a GradScaler's scale over
        # the gradient-accumulation steps): the push is multiplied by it too, so that it keeps its
        # weight against the task once the optimiser sees unscaled gradients. Not saved; set by
        # lightning_kr.set_loss_scale (KRClassifier does it before every backward).
        self.loss_scale = 1.0

        self.fuse = nn.Linear(repr_dim + in_channels, self.hidden)
        self.norm: nn.Module | None = None
        if norm == "batch":
            self.norm = nn.BatchNorm1d(self.hidden, eps=BATCH_NORM_EPS)
        elif norm == "layer":
            self.norm = nn.LayerNorm(self.hidden, elementwise_affine=False)
        # Read-out of the logits: 1/√hidden after the LayerNorm (its earlier default, kept for its
        # checkpoints); 1 after the BatchNorm, whose across-sample standardised hidden vector makes
        # a head's step change the logits of different samples differently (see the module doc).
        self.readout = self.hidden**-0.5 if norm == "layer" else 1.0
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

    def randomise_heads(self, scales: Mapping[str, float]) -> None:
        """Start the heads of the kinds in ``scales`` random: weights ``N(0, scale² / hidden)``, so
        each logit varies across images by about ``0.7 · scale`` (the hidden units are normalised
        across the batch and rectified: mean square ≈ 0.5); a scale of 0 leaves a head as it is.
        The attentions then differ between images from the first step (``KRConfig.dynamic_init``)."""
        for kind, head in self.heads.items():
            scale = scales.get(kind, 0.0)
            if scale > 0:
                nn.init.normal_(head.weight, std=scale / self.hidden**0.5)

    @property
    def gate_bounds(self) -> tuple[float, float]:
        """The open interval the gates lie in: ``(1 - gate_range, 1 + gate_range)`` for neutral
        gates, ``(0, gate_scale)`` for ODConv's sigmoid."""
        if self.gate_scale == 2.0:
            return 1.0 - self.gate_range, 1.0 + self.gate_range
        return 0.0, self.gate_scale

    def _gates(self, logits: Tensor) -> Tensor:
        """Channel / filter / spatial gates from their logits (B, E) → (B, E).

        Neutral gates (``gate_scale = 2``): ``1 + r·tanh(z / 2r)``, ``r = gate_range``: 1 at
        ``z = 0``, slope 1/2 there whatever ``r``, values in ``(1 - r, 1 + r)``; ``r = 1`` is
        ``2·sigmoid(z)``. ODConv's gates (``gate_scale = 1``): ``sigmoid(z)``.
        """
        if self.gate_scale != 2.0 or self.gate_range == 1.0:
            gates = torch.sigmoid(logits)
            return gates * self.gate_scale if self.gate_scale != 1.0 else gates
        r = self.gate_range
        return torch.tanh(logits * (0.5 / r)) * r + 1.0

    def ramp_in(self, steps: int) -> None:
        """Scale the logits by ``min(1, t / steps)``, ``t`` the number of training forward passes
        this generator has run (a persistent buffer ``ramp_step``, saved and resumed with the
        weights): every attention is exactly neutral at step 0 even with random heads, and
        reaches its full dynamism after ``steps`` passes (``KRConfig.dynamic_warmup``).

        A training-mode pass counts whatever the grad mode (a reentrant activation checkpoint runs
        its first pass under ``no_grad``); the recomputation of a checkpointed block during
        backward does not count and uses the scale of the pass it recomputes.
        """
        if steps < 1:
            raise ValueError(f"ramp_in needs steps >= 1; got {steps}")
        self.ramp_steps = int(steps)
        self._count_passes()

    def warm_up_dynamism(self, passes: int) -> None:
        """Ramp the weight of the dynamism push (:class:`DynamismFloor`) in from zero over this
        many training passes, ``weight · min(1, t / passes)``, counted in the same saved buffer
        ``ramp_step`` as :meth:`ramp_in` (``KRConfig.dynamism_warmup``): the first steps of
        training follow the task alone, and the push grows the variation the task has started."""
        if passes < 1:
            raise ValueError(f"warm_up_dynamism needs passes >= 1; got {passes}")
        self.dynamism_warmup = int(passes)
        self._count_passes()

    def amplify_features(self, floor: float) -> None:
        """Amplify the input features ``h`` (B, C_in) to an across-image scale of at least
        ``floor`` before the fusion (``KRConfig.feature_floor``): ``h · max(1, floor / s)``, ``s``
        the running root mean square over features of ``h``'s standard deviation across the
        batch (the saved buffer ``feature_scale``; 0 until a training batch of more than one
        sample has been seen, and then no amplification), ramped in over the push's warm-up
        (``KRConfig.dynamism_warmup``; :meth:`feature_gain`).

        Why: the BatchNorm's variance floor (``eps = 1``) damps a hidden unit whose variation
        across images is small in absolute terms, and the push reaches only this generator's
        weights. Where ``h`` barely varies between images (a transformer's attention output or
        MLP hidden before its projection: across-image std 0.005–0.07), the hidden vector did
        not vary, the push had nothing to grow, and without ``d`` (ODConv / DyConv) those layers
        stayed static (spread 1e-6–0.04 after training; docs/learning.md, "Dynamism"). A
        ResNet's pooled features vary by 0.1–0.9 once trained and are left as they are."""
        if floor <= 0:
            raise ValueError(f"amplify_features needs floor > 0; got {floor}")
        self.feature_floor = float(floor)
        if not hasattr(self, "feature_scale"):
            self.register_buffer("feature_scale", torch.zeros(()), persistent=True)

    def feature_gain(self, step: Tensor | None = None) -> Tensor | None:
        """``max(1, floor / s)`` (0-d) for the running scale ``s`` (1 while ``s`` is unmeasured),
        ramped in over the push's warm-up (:meth:`warm_up_dynamism`) as
        ``1 + (gain − 1) · min(1, t / passes)``, ``t`` = ``step`` or, by default, the passes
        counted so far; None when the features are not amplified."""
        if not self.feature_floor:
            return None
        scale = self.feature_scale
        gain = (self.feature_floor / scale.clamp_min(1e-12)).clamp_min(1.0)
        gain = torch.where(scale > 0, gain, torch.ones_like(gain))
        if self.dynamism_warmup:
            count = self.ramp_step if step is None else step
            gain = 1.0 + (gain - 1.0) * (count.to(gain.dtype) / self.dynamism_warmup).clamp(max=1.0)
        return gain

    def _amplified(self, h: Tensor) -> Tensor:
        """``h`` (B, C_in) times :meth:`feature_gain`, the running scale first updated from this
        batch in training (not by a checkpointed block's recomputation, which reads the scale and
        the pass count its first pass saw, nor by a batch of one sample)."""
        if not self.feature_floor:
            return h
        recomputing = self._recomputing()
        if self.training and h.shape[0] > 1 and not recomputing:
            with torch.no_grad():
                batch = h.detach().float().std(0).square().mean().sqrt()
                old = self.feature_scale
                moved = old * (1 - FEATURE_MOMENTUM) + batch * FEATURE_MOMENTUM
                # out of place, as the pass counter (see _pass_index)
                self.feature_scale = torch.where(old > 0, moved, batch).to(old.dtype)
        step = None
        if self.dynamism_warmup and recomputing:
            step = self.ramp_step - 1  # the first pass read the count before counting itself
        gain = self.feature_gain(step)
        assert gain is not None
        return h * gain.detach().to(h.dtype)

    def _count_passes(self) -> None:
        if not hasattr(self, "ramp_step"):
            self.register_buffer("ramp_step", torch.zeros((), dtype=torch.long), persistent=True)

    def _recomputing(self) -> bool:
        """Whether this training pass runs inside backward: a checkpointed block's recomputation,
        which must read what its first pass read and count nothing again."""
        return self.training and not tracing.compiling() and torch._C._current_graph_task_id() != -1

    def _pass_index(self) -> Tensor | None:
        """The index of this training pass (a 0-d tensor), counting it; None when nothing counts.

        A training pass run inside backward is a checkpointed block's recomputation: its first
        pass was counted, so it takes that pass's index and does not count again. An eval pass
        reads the count without adding to it (and only the logits' ramp needs it there)."""
        if not (self.ramp_steps or (self.dynamism_warmup and self.training)):
            return None
        step = self.ramp_step
        if self._recomputing():
            return step - 1
        if self.training:
            # out of place: torch.compile's backward may recompute values read from the counter,
            # and would read a counter changed in place as the next pass's
            self.ramp_step = step + 1
            return step
        return step

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

    def _hidden(self, fused_in: Tensor, update_statistics: bool = True) -> Tensor:
        """``relu(norm(fuse(fused_in)))``: (B, D + C_in) → (B, hidden); ``update_statistics=False``
        leaves a BatchNorm's running statistics as they are (the push's recomputation)."""
        fused = self.fuse(fused_in)
        norm = self.norm
        if isinstance(norm, nn.BatchNorm1d) and self.training and not update_statistics:
            fused = F.batch_norm(fused, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
        elif norm is not None:
            fused = self._normalize(fused)
        return F.relu(fused)

    def _normalize(self, fused: Tensor) -> Tensor:
        """The norm of the hidden vector (B, hidden); a BatchNorm normalises one sample in training
        as in eval (running statistics, not updated), so batch size 1 trains."""
        norm = self.norm
        assert norm is not None
        if isinstance(norm, nn.BatchNorm1d) and self.training and fused.shape[0] == 1:
            return F.batch_norm(
                fused,
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                False,
                0.0,
                norm.eps,
            )
        return norm(fused)

    def _pushes_dynamism(self, logits: Tensor) -> bool:
        return (
            self.training
            and self.dynamism_floor > 0
            and self.dynamism_weight > 0
            and logits.shape[0] > 1
            and torch.is_grad_enabled()
        )

    def _dynamism_push(
        self,
        fused_in: Tensor,
        weight: Tensor,
        bias: Tensor,
        scale: Tensor | float,
        push_weight: Tensor | float,
    ) -> Tensor:
        """Zeros (B, E) whose gradient is :class:`DynamismFloor`'s push on the logits, reaching only
        this generator's weights: the logits are recomputed from ``fused_in`` (B, D + C_in) detached,
        with the batch's statistics (the running ones are not updated twice)."""
        hidden = self._hidden(fused_in.detach(), update_statistics=False)
        logits = F.linear(hidden, weight, bias) * scale
        pushed = DynamismFloor.apply(
            logits, self.dynamism_floor, push_weight, self.dynamism_projection
        )
        return pushed - pushed.detach()

    def folded_for_inference(self) -> FoldedGenerator | None:
        """This generator folded into fewer operators (:mod:`~lightning_kr.layers.folded_generator`)
        where that computes the same attentions and nothing needs more: eval mode, no gradient
        recorded (``torch.no_grad`` / ``inference_mode``), no tracer, exporter, compiler or
        dispatch mode such as ``FlopCounterMode`` (they record or count the generator's own
        operators). Rebuilt when any parameter or buffer changed."""
        if (
            self.training
            or torch.is_grad_enabled()
            or tracing.plain_operators()
            or tracing.compiling()
            or tracing.dispatch_mode()
        ):
            return None
        # its modules read from their dicts (cheaper than self.modules(), and always current)
        modules = [self, *self._modules.values(), *self.heads._modules.values()]
        if self.represent is not None:
            modules.extend(self.represent._modules.values())
        sources = [
            t
            for module in modules
            if module is not None
            for t in (*module._parameters.values(), *module._buffers.values())
            if t is not None
        ]
        # the plain attributes the fold reads (set at conversion; a change must refold too)
        settings = (
            self.gate_range,
            self.gate_scale,
            self.readout,
            self.ramp_steps,
            self.feature_floor,
        )
        key = (*source_key(sources), settings)
        folded: FoldedGenerator | None = self.__dict__.get("_folded")
        if folded is None or folded.key != key:
            folded = fold(self, key)
            self.__dict__["_folded"] = folded  # not a submodule: never saved
        return folded

    def forward(self, h: Tensor, d: Tensor | None) -> Attentions:
        folded = self.folded_for_inference()
        if folded is None:
            h = self._amplified(h)  # the folded generator has the gain in its fusion weight
        if self.uses_repr:
            if d is None:
                raise ValueError("this KR layer needs a representation d of shape (B, D); got None")
            fused_in = torch.cat([d.to(h.dtype), h], dim=1)
        else:
            fused_in = h
        if folded is not None:
            values, repr_out = run_folded(folded, fused_in)
            return Attentions.of(dict(zip(self.heads.keys(), values, strict=True)), repr_out)
        fused = self._hidden(fused_in)
        # All heads as one matrix product, one temperature division and one sigmoid (a batch-1
        # forward is bound by the number of small operators); the heads stay separate parameters.
        heads = list(self.heads.values())
        if heads:
            weight = (
                torch.cat([head.weight for head in heads]) if len(heads) > 1 else heads[0].weight
            )
            bias = torch.cat([head.bias for head in heads]) if len(heads) > 1 else heads[0].bias
            scale: Tensor | float = self.readout / self.temperature
            step = self._pass_index()
            if self.ramp_steps:
                assert step is not None
                ramp = (step.to(fused.dtype) / self.ramp_steps).clamp(max=1.0)
                scale = scale * ramp
            logits = F.linear(fused, weight, bias) * scale
            if self._pushes_dynamism(logits):
                push_weight: Tensor | float = self.dynamism_weight
                if self.dynamism_warmup:
                    assert step is not None
                    warm = (step.to(fused.dtype) + 1) / self.dynamism_warmup
                    push_weight = warm.clamp(max=1.0) * self.dynamism_weight
                push_weight = push_weight * self.loss_scale
                logits = logits + self._dynamism_push(fused_in, weight, bias, scale, push_weight)
        else:  # e.g. DyConv at n = 1: no attention at all, the layer is its static convolution
            logits = fused.new_zeros(fused.shape[0], 0)
        kinds = list(self.heads.keys())
        sizes = [head.out_features for head in heads]
        gated = sum(size for kind, size in zip(kinds, sizes, strict=True) if kind != "kernel")
        values: list[Tensor] = []
        if gated:
            gates = self._gates(logits[:, :gated])
            values.extend(gates.split(sizes[: len(sizes) - ("kernel" in self.heads)], dim=1))
        if "kernel" in self.heads:  # always the last head
            values.append(torch.softmax(logits[:, gated:], dim=1))
        out: dict[str, Tensor] = dict(zip(kinds, values, strict=True))
        repr_out = None
        if self.represent is not None:
            summaries = [self._summarise(kind, attention) for kind, attention in out.items()]
            repr_out = self.represent(torch.cat([fused, *summaries], dim=1))
        return Attentions.of(out, repr_out)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, repr_dim={self.repr_dim}, kernel_num={self.kernel_num}, "
            f"attentions={tuple(self.heads.keys())}, gate_scale={self.gate_scale}, "
            f"norm={type(self.norm).__name__ if self.norm is not None else None}"
        )
