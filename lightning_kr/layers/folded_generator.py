"""The kernel generator folded for inference: the same attentions in a third of the operators.

At batch 1 a KR layer's time outside its convolution is the number of small operators its
:class:`~lightning_kr.layers.kernel_generator.KernelGenerator` launches (about 25). Without
gradients and in eval mode every step between ``cat[d, h]`` and the attentions is affine or
elementwise with fixed parameters, so :class:`FoldedGenerator` precomputes:

* the fusion ``Linear``, the gain of the input features ``h`` in front of it
  (:meth:`~lightning_kr.layers.kernel_generator.KernelGenerator.amplify_features`) and the
  eval-mode ``BatchNorm1d`` after it as one ``Linear``
  (``W' = s ⊙ W``, ``b' = s ⊙ (b − μ) + β``, ``s = γ / √(σ² + eps)``; a LayerNorm, per sample,
  stays);
* every head as one matrix, with the read-out, the temperature and the gates' ``1 / 2r`` folded
  into its rows, so a gate is ``r·tanh(z) + 1`` and the kernel-number attention ``softmax(z)``;
* the representation generator ``K`` reading the attentions themselves: the channel and filter
  summaries (bin averages, a fixed linear map ``P``) are folded into its weight (``W_c P``).

Its outputs equal the generator's up to float rounding (tested). It is rebuilt whenever a parameter
or buffer it read changes (their versions and storage are compared on every call) or one of the
generator's settings (gate range and scale, read-out, ramp, feature floor), and used only
where nothing needs gradients or a trace: see :meth:`KernelGenerator.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FoldedGenerator:
    """The precomputed weights of one eval-mode generator.

    Shapes (``E`` = gate entries, ``n`` kernel-number entries, ``D`` = repr size): ``fuse_weight``
    (hidden, D + C_in), ``fuse_bias`` (hidden,), ``head_weight`` (E + n, hidden), ``head_bias``
    (E + n,), ``repr_weight`` (D, hidden + E + n) or None, ``repr_bias`` (D,) or None.
    ``gated``: ``E``; ``sizes``: the entries of each head in order; ``gate_range``: ``r`` of
    neutral gates (0: ODConv's sigmoid gates, with ``gate_scale`` their factor).
    """

    key: tuple
    fuse_weight: Tensor
    fuse_bias: Tensor
    layer_norm: nn.LayerNorm | None
    head_weight: Tensor | None
    head_bias: Tensor | None
    gated: int
    sizes: list[int]
    gate_range: float
    gate_scale: float
    repr_weight: Tensor | None
    repr_bias: Tensor | None
    repr_norm: nn.LayerNorm | None


def source_key(tensors: list[Tensor]) -> tuple:
    """What identifies the values of ``tensors``: their storage and version (moving or casting a
    module gives its tensors new storage; an in-place update bumps the version)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def fold(generator: nn.Module, key: tuple) -> FoldedGenerator:
    """Fold ``generator`` (a :class:`KernelGenerator` in eval mode) as the module doc says;
    ``key``: what identifies the values it reads (:func:`source_key` of its tensors and its
    settings), kept to tell when to fold again."""
    with torch.no_grad():
        fuse_weight, fuse_bias = generator.fuse.weight, generator.fuse.bias
        gain = generator.feature_gain()
        if gain is not None:  # KernelGenerator.amplify_features: h is the last C_in columns
            columns = torch.ones_like(fuse_weight[0])
            columns[fuse_weight.shape[1] - generator.in_channels :] = gain.to(columns)
            fuse_weight = fuse_weight * columns
        norm = generator.norm
        if isinstance(norm, nn.BatchNorm1d):
            inv_std = torch.rsqrt(norm.running_var + norm.eps)
            scale = inv_std if norm.weight is None else inv_std * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            fuse_weight = fuse_weight * scale[:, None]
            fuse_bias = fuse_bias * scale + shift
        heads = list(generator.heads.values())
        kinds = list(generator.heads.keys())
        sizes = [head.out_features for head in heads]
        gated = sum(s for kind, s in zip(kinds, sizes, strict=True) if kind != "kernel")
        head_weight = head_bias = None
        neutral = generator.gate_scale == 2.0 and generator.gate_range != 1.0
        if heads:
            head_weight = torch.cat([head.weight for head in heads])
            head_bias = torch.cat([head.bias for head in heads])
            rows = torch.full_like(head_bias, generator.readout) / generator.temperature
            if generator.ramp_steps:  # KernelGenerator.ramp_in, at the count it has reached
                rows *= (generator.ramp_step.to(rows.dtype) / generator.ramp_steps).clamp(max=1.0)
            if neutral:  # r·tanh(z / 2r) + 1: fold 1 / 2r into the gate rows
                rows[:gated] *= 0.5 / generator.gate_range
            head_weight = head_weight * rows[:, None]
            head_bias = head_bias * rows
        repr_weight = repr_bias = repr_norm = None
        if generator.represent is not None:
            linear, repr_norm = generator.represent[0], generator.represent[1]
            hidden = generator.hidden
            parts = [linear.weight[:, :hidden]]
            start = hidden
            for kind, size in zip(kinds, sizes, strict=True):
                width = generator._summary_size(kind, size)
                block = linear.weight[:, start : start + width]
                if width != size:  # the summary averages bins: a fixed (size → width) linear map
                    eye = torch.eye(size, dtype=block.dtype, device=block.device)
                    block = block @ generator._summarise(kind, eye).T
                parts.append(block)
                start += width
            repr_weight = torch.cat(parts, dim=1)
            repr_bias = linear.bias
        return FoldedGenerator(
            key=key,
            fuse_weight=fuse_weight.detach().clone(),
            fuse_bias=fuse_bias.detach().clone(),
            layer_norm=norm if isinstance(norm, nn.LayerNorm) else None,
            head_weight=head_weight,
            head_bias=head_bias,
            gated=gated,
            sizes=sizes,
            gate_range=generator.gate_range if neutral else 0.0,
            gate_scale=generator.gate_scale,
            repr_weight=None if repr_weight is None else repr_weight.detach().clone(),
            repr_bias=None if repr_bias is None else repr_bias.detach().clone(),
            repr_norm=repr_norm,
        )


def run_folded(folded: FoldedGenerator, fused_in: Tensor) -> tuple[list[Tensor], Tensor | None]:
    """The attentions of each head, in order (each (B, size)), and ``d_{i+1}`` (B, D) or None,
    for the fusion's input ``fused_in`` (B, D + C_in)."""
    dtype = fused_in.dtype
    hidden = F.linear(fused_in, folded.fuse_weight.to(dtype), folded.fuse_bias.to(dtype))
    if folded.layer_norm is not None:  # per sample: nothing to fold
        hidden = folded.layer_norm(hidden)
    hidden = hidden.relu_()
    if folded.head_weight is None:
        attentions = hidden.new_zeros(hidden.shape[0], 0)
    else:
        logits = F.linear(hidden, folded.head_weight.to(dtype), folded.head_bias.to(dtype))
        gated = folded.gated
        if gated == logits.shape[1]:
            attentions = _gates(folded, logits)
        else:
            kernel = torch.softmax(logits[:, gated:], dim=1)
            attentions = (
                torch.cat([_gates(folded, logits[:, :gated]), kernel], 1) if gated else kernel
            )
    values = list(attentions.split(folded.sizes, dim=1)) if folded.sizes else []
    repr_out = None
    if folded.repr_weight is not None:
        weight = folded.repr_weight.to(dtype)
        hidden_size = hidden.shape[1]
        summed = F.linear(hidden, weight[:, :hidden_size], folded.repr_bias.to(dtype))
        if attentions.shape[1]:
            summed = summed.addmm_(attentions, weight[:, hidden_size:].T)
        norm = folded.repr_norm
        assert norm is not None
        repr_out = F.layer_norm(summed, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return values, repr_out


def _gates(folded: FoldedGenerator, logits: Tensor) -> Tensor:
    if folded.gate_range:
        return logits.tanh().mul_(folded.gate_range).add_(1.0)
    gates = logits.sigmoid()
    return gates.mul_(folded.gate_scale) if folded.gate_scale != 1.0 else gates
