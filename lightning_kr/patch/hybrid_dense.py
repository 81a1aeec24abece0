"""HybridDense: a dense layer with a learned scale and a learned, bounded power per output."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HybridVariant = Literal["signed", "relu"]


def hybrid_activation(
    z: Tensor,
    scale: Tensor | None,
    power: Tensor,
    eps: float,
    variant: HybridVariant = "signed",
) -> Tensor:
    """The HybridDense nonlinearity, ``sign(z) · s · ((base + eps) ** p - eps ** p)``.

    ``base`` is ``|z|`` for ``variant="signed"`` and ``relu(z)`` for ``variant="relu"``. The power is
    taken in float32 (float64 for float64 input) whatever the dtype of ``z``, bfloat16 autocast
    included, and the result is cast back to ``z.dtype``. Without autograd (inference) the work is
    done in place on one buffer: the tensors are large inside :class:`PatchDynamicConv2d`.

    Args:
        z: pre-activations, any shape ``(..., *S)``.
        scale: learned scale ``s`` broadcastable to ``z`` (usually of the trailing shape ``S``), or
            ``None`` when the caller folds ``s`` into the next linear map.
        power: exponent ``p > 0``, broadcastable to ``z``.
        eps: offset that keeps the base of the power away from 0.
        variant: ``"signed"`` (odd in ``z``) or ``"relu"`` (zero for ``z <= 0``).

    Returns:
        Tensor of the shape and dtype of ``z``.
    """
    out_dtype = z.dtype
    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(compute_dtype)
    power = power.to(compute_dtype)
    offset = torch.pow(eps, power)
    base = z.abs() if variant == "signed" else z.clamp_min(0.0)
    if torch.is_grad_enabled():
        out = torch.copysign((base + eps).pow(power) - offset, z)
        if scale is not None:
            out = out * scale.to(compute_dtype)
    else:
        out = base.add_(eps).pow_(power).sub_(offset).copysign_(z)
        if scale is not None:
            out.mul_(scale.to(compute_dtype))
    return out.to(out_dtype)


class _HybridActivationDot(torch.autograd.Function):
    """``sum_dim(sign(z) · ((base + eps) ** p - eps ** p) · q)`` with a hand-written backward.

    Autograd would keep five temporaries of the size of ``z`` and make as many again in the
    backward pass; here only ``z`` and ``q`` are saved and the rest is recomputed in place.
    """

    @staticmethod
    def forward(
        ctx, z: Tensor, q: Tensor, power: Tensor, eps: float, relu: bool, dim: int
    ) -> Tensor:
        dtype = torch.promote_types(z.dtype, torch.float32)
        z_, power_ = z.to(dtype), power.to(dtype)
        base = z_.clamp_min(0.0) if relu else z_.abs()
        magnitude = base.add_(eps).log_().mul_(power_).exp_().sub_(torch.pow(eps, power_))
        out = magnitude.copysign_(z_).mul_(q.to(dtype)).sum(dim)
        ctx.save_for_backward(z, q, power)
        ctx.eps, ctx.relu, ctx.dim = eps, relu, dim
        return out.to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        z, q, power = ctx.saved_tensors
        eps = ctx.eps
        dtype = torch.promote_types(z.dtype, torch.float32)
        z_, power_ = z.to(dtype), power.to(dtype)
        grad = grad_out.to(dtype).unsqueeze(ctx.dim)
        offset = torch.pow(eps, power_)
        base = z_.clamp_min(0.0) if ctx.relu else z_.abs()
        log_base = base.add_(eps).log_()  # log(a), a = base + eps >= eps
        powered = (log_base * power_).exp_()  # a ** p
        grad_q = (powered - offset).copysign_(z_).mul_(grad)
        grad_dot = q.to(dtype) * grad  # d out / d f(z), f the activation
        grad_power = (powered * log_base).sub_(offset * math.log(eps)).mul_(z_.sign())
        grad_power = grad_power.mul_(grad_dot).sum_to_size(power.shape)
        grad_z = powered.div_(log_base.exp_()).mul_(power_).mul_(grad_dot)  # p · a ** (p - 1)
        if ctx.relu:
            grad_z.masked_fill_(z_ <= 0, 0.0)
        return grad_z.to(z.dtype), grad_q.to(q.dtype), grad_power.to(power.dtype), None, None, None


def hybrid_activation_dot(
    z: Tensor,
    q: Tensor,
    power: Tensor,
    eps: float,
    variant: HybridVariant = "signed",
    dim: int = -1,
) -> Tensor:
    """``(hybrid_activation(z, None, power, eps, variant) * q).sum(dim)``, fused.

    The same value, in float32 (float64 for float64 input) whatever the dtype, with far less
    memory traffic in training; it is how :class:`PatchDynamicConv2d` contracts its last hidden
    features with the patch projections. Its gradient in ``z`` at exactly ``z = 0`` is the
    one-sided limit ``p · eps ** (p - 1) · q`` (``variant="signed"``) where autograd through
    ``|z|`` would give 0; both are finite.

    Args:
        z: pre-activations ``(..., h, ...)``.
        q: the vectors to dot with, same shape as ``z``.
        power: exponent ``p``, broadcastable to ``z``.
        eps: offset inside the power.
        variant: ``"signed"`` or ``"relu"``.
        dim: the dimension ``h`` summed over.

    Returns:
        Tensor of the shape of ``z`` without ``dim``, in ``z.dtype``.
    """
    return _HybridActivationDot.apply(z, q, power, eps, variant == "relu", dim)


class HybridDense(nn.Module):
    """Dense layer ``z = W x + b`` followed by a signed power with learned scale ``s`` and power ``p``.

    The preprint: the linear output goes through "ReLU with a small epsilon", is multiplied by learned
    scales, raised to learned (clipped) powers, given the sign of the linear output, and NaNs are
    replaced by zero. Read literally that is ``sign(z) · s · (relu(z) + eps) ** p``, which for
    ``z < 0`` is the constant ``-s · eps ** p``: the sign then does nothing but add a tiny offset, and
    with ``p < 1`` the function jumps by ``s · eps ** p`` at 0. We use

    ``f(z) = sign(z) · s · ((|z| + eps) ** p - eps ** p)``     (``variant="signed"``, the default)

    which keeps every word of the text (epsilon inside the power, learned scale, learned power, sign
    of the linear output) and is numerically sound:

    * ``f`` is odd and continuous, ``f(0) = 0``, and ``p = 1`` gives ``s · z`` exactly;
    * ``p = p_min + (p_max - p_min) · sigmoid(power_logit)`` stays inside ``(p_min, p_max)``, so the
      power is "clipped" smoothly and keeps a gradient at the bounds;
    * the base is ``>= eps > 0``, so ``log(base)`` in the gradient of ``p`` is finite, and the slope
      at 0, ``s · p · eps ** (p - 1)``, is finite (at most 16 · s with the defaults) where a bare
      ``|z| ** p`` with ``p < 1`` has an infinite one;
    * the power is computed in float32 even under bfloat16 autocast.

    NaNs cannot arise from finite inputs, so the preprint's NaN-to-zero step is not needed (and would
    hide upstream bugs). ``variant="relu"`` keeps the preprint's ReLU reading, ``s · ((relu(z) + eps)
    ** p - eps ** p)``: identical for ``z > 0``, exactly 0 (instead of ``-s · eps ** p``) for ``z <= 0``.

    With ``num_predictors=G`` the layer is ``G`` independent dense layers evaluated at once (the
    ``G`` kernel predictors of :class:`PatchDynamicConv2d`): weights ``(G, out, in)``, input
    ``(..., G, in)``, output ``(..., G, out)``.

    Args:
        in_features: size ``in`` of each input vector.
        out_features: size ``out`` of each output vector.
        num_predictors: ``None`` for one ordinary layer, or the number ``G`` of independent layers.
        eps: offset inside the power.
        power_range: ``(p_min, p_max)``, the open interval the learned power lives in.
        power_init: initial power, inside ``power_range`` (1 makes the layer start linear).
        variant: ``"signed"`` or ``"relu"``, see above.

    Example::

        >>> layer = HybridDense(192, 16)
        >>> layer(torch.randn(8, 192)).shape
        torch.Size([8, 16])
        >>> HybridDense(192, 16, num_predictors=4)(torch.randn(8, 4, 192)).shape
        torch.Size([8, 4, 16])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_predictors: int | None = None,
        eps: float = 1e-3,
        power_range: tuple[float, float] = (0.5, 3.0),
        power_init: float = 1.0,
        variant: HybridVariant = "signed",
    ) -> None:
        super().__init__()
        p_min, p_max = power_range
        if not 0.0 < p_min < power_init < p_max:
            raise ValueError(
                f"HybridDense needs 0 < p_min < power_init < p_max, got power_range={power_range} "
                f"and power_init={power_init}; widen power_range or move power_init inside it."
            )
        if variant not in ("signed", "relu"):
            raise ValueError(f"HybridDense variant must be 'signed' or 'relu', got {variant!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.num_predictors = num_predictors
        self.eps = eps
        self.power_range = (float(p_min), float(p_max))
        self.variant: HybridVariant = variant
        groups = () if num_predictors is None else (num_predictors,)
        self.weight = nn.Parameter(torch.empty(*groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(*groups, out_features))
        self.scale = nn.Parameter(torch.ones(*groups, out_features))
        unit = (power_init - p_min) / (p_max - p_min)
        self.power_logit = nn.Parameter(
            torch.full((*groups, out_features), math.log(unit / (1 - unit)))
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, ``U(-1/sqrt(in), 1/sqrt(in))``, for every predictor."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def power(self) -> Tensor:
        """Learned power ``p`` (at least float32), shape ``(out,)`` or ``(G, out)``, inside ``power_range``."""
        p_min, p_max = self.power_range
        logit = self.power_logit.to(torch.promote_types(self.power_logit.dtype, torch.float32))
        return p_min + (p_max - p_min) * torch.sigmoid(logit)

    def activation(self, z: Tensor) -> Tensor:
        """Apply the learned signed power to pre-activations ``z`` of shape ``(..., [G,] out)``."""
        return hybrid_activation(z, self.scale, self.power, self.eps, self.variant)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` of shape ``(..., in)`` (or ``(..., G, in)``) to ``(..., out)`` (or ``(..., G, out)``)."""
        if self.num_predictors is None:
            z = F.linear(x, self.weight, self.bias)
        else:
            z = torch.einsum("...gi,goi->...go", x, self.weight) + self.bias
        return self.activation(z)

    def extra_repr(self) -> str:
        predictors = (
            "" if self.num_predictors is None else f", num_predictors={self.num_predictors}"
        )
        return (
            f"{self.in_features}, {self.out_features}{predictors}, eps={self.eps}, "
            f"power_range={self.power_range}, variant={self.variant!r}"
        )
