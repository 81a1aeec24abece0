"""Naive per-sample references the fast implementations are tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kr.layers.kernel_generator import Attentions


def tiny_cnn() -> nn.Sequential:
    """Two 3×3 convolutions (the first stays static when converted), pooling and two linear layers
    (the last is the classifier): a KR model of two KR layers, ``1`` and ``4``, for callback tests."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.Linear(8, 2),
    )


def trained_looking(
    model: nn.Module, scale: float = 0.2, *, batchnorm_statistics: bool = False
) -> nn.Module:
    """``model``, in train mode, with its attentions moved off their neutral start (so that ``d`` and
    every attention shape the result) and, optionally, BatchNorm running statistics that are not
    (0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "generator" in name or "kr_head" in name:
                p.add_(scale * torch.randn_like(p))
        if batchnorm_statistics:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model.train()


def per_sample_kernels(
    weight: Tensor, att: Attentions, groups: int, batch: int | None = None
) -> Tensor:
    """W_b = √n sum_n a_kn[b,n] · a_s[b] ⊙ a_c[b] ⊙ a_f[b] ⊙ V_n, built explicitly: (B, O, I/g, kh, kw).

    ``weight`` holds a KR layer's stored candidates ``V_n`` (the kernels divided by √n, see
    :class:`~lightning_kr.layers.kr_layer.KRLayer`); ``att`` is its generator's output.
    """
    n, c_out, c_in_g, kh, kw = weight.shape
    if batch is None:
        batch = next(
            a for a in (att.channel, att.filter, att.spatial, att.kernel) if a is not None
        ).shape[0]
    kernels = []
    for b in range(batch):
        k = torch.zeros(c_out, c_in_g, kh, kw, dtype=weight.dtype)
        for i in range(n):
            w = weight[i].clone()
            if att.kernel is not None:
                w = w * att.kernel[b, i] * math.sqrt(n)
            k = k + w
        if att.spatial is not None:
            k = k * att.spatial[b].view(1, 1, kh, kw)
        if att.channel is not None:
            # input channel of weight[o, j] is (o // (O/g)) * (I/g) + j
            group_of_out = torch.arange(c_out) // (c_out // groups)
            in_index = group_of_out[:, None] * c_in_g + torch.arange(c_in_g)[None, :]
            k = k * att.channel[b][in_index][:, :, None, None]
        if att.filter is not None:
            k = k * att.filter[b].view(c_out, 1, 1, 1)
        kernels.append(k)
    return torch.stack(kernels)


def naive_dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    att: Attentions,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups,
) -> Tensor:
    """One F.conv2d per sample with its explicit kernel."""
    kernels = per_sample_kernels(weight, att, groups)
    outs = [
        F.conv2d(x[b : b + 1], kernels[b], bias, stride, padding, dilation, groups)
        for b in range(x.shape[0])
    ]
    return torch.cat(outs)


def assert_same_values_and_gradients(
    y: Tensor, expected: Tensor, inputs: tuple[Tensor, ...]
) -> None:
    """``y == expected`` and, for one random output gradient, equal gradients w.r.t. ``inputs``."""
    torch.testing.assert_close(y, expected)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, grad_out)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
