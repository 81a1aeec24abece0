"""What every KR layer shares: candidate kernels taken from a static layer, and its place in the chain."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_kr.layers.repr_chain import BatchLayout, ReprChain


def candidates_from_static(weight: Tensor, kernel_num: int, noise: float) -> Tensor:
    """``n`` candidate kernels that start from a static kernel.

    ``W_n = W + eps_n`` with ``sum_n eps_n = 0``: the uniform mixture (kernel-number attention at
    initialisation) is exactly ``W``, so pretrained weights carry over, while the candidates differ
    and the kernel-number attention has a gradient to break their symmetry.

    Args:
        weight: static kernel of any shape ``S``.
        kernel_num: ``n``.
        noise: standard deviation of ``eps`` relative to the standard deviation of ``W``.

    Returns:
        (n, *S).
    """
    stacked = weight.detach().unsqueeze(0).repeat(kernel_num, *([1] * weight.dim())).clone()
    if kernel_num > 1 and noise > 0:
        scale = noise * weight.detach().float().std().clamp_min(1e-8)
        eps = torch.randn_like(stacked, dtype=torch.float32) * scale
        eps = eps - eps.mean(dim=0, keepdim=True)
        stacked = stacked + eps.to(stacked.dtype)
    return stacked


class KRLayer(nn.Module):
    """Base of the KR convolutions (:class:`KRConvNd`) and :class:`KRLinear`
    (:class:`KRMultiheadAttention` and :class:`KRShiftedWindowAttention` hold two :class:`KRLinear`
    links and are no link themselves).

    A KR layer is attached to a :class:`ReprChain` by :func:`~lightning_kr.kr_convert` (or by hand with
    :meth:`attach`). Its ``forward`` reads ``d_i`` from the chain and writes ``d_{i+1}``; the pure form
    ``forward_with_repr(x, d) -> (y, d_next)`` needs no chain.

    Candidates are stored divided by ``√n`` and mixed with ``√n · a_kn`` (``W_b = √n Σ_n a_kn[b,n] V_n``,
    the same kernels). With the plain mixture each candidate receives ``a_kn ≈ 1/n`` of the kernel's
    gradient, so an SGD step moved the mixed kernel ``n`` times less than the static kernel's step and
    a 4x network learned four times slower; with the ``√n`` factor the step is the static one.
    """

    kr_name: str = ""
    batch_layout: BatchLayout = "batch"  # how the input's rows relate to the model's samples

    def attach(
        self, chain: ReprChain | None, name: str, *, batch_layout: BatchLayout | None = None
    ) -> None:
        """Attach to ``chain`` under the qualified module name ``name`` (used in error messages);
        ``batch_layout``: how the rows of this layer's input relate to the model's samples (set by
        :func:`~lightning_kr.kr_convert` from its probe pass)."""
        # A plain attribute, not a submodule: the chain holds no parameters and must not be saved.
        self.__dict__["_chain"] = chain
        self.kr_name = name
        if batch_layout is not None:
            self.batch_layout = batch_layout

    @property
    def chain(self) -> ReprChain | None:
        return self.__dict__.get("_chain")

    @property
    def uses_repr(self) -> bool:
        """Whether this layer reads ``d`` (False in the ODConv / DyConv ablations)."""
        return any(getattr(m, "repr_dim", 0) > 0 for m in self.modules())

    def read_repr(self, batch_size: int) -> Tensor | None:
        if not self.uses_repr:
            return None
        chain = self.chain
        if chain is None:
            raise RuntimeError(
                f"{type(self).__name__} '{self.kr_name or '?'}' uses a kernel representation but is "
                "attached to no chain. Use it inside the model returned by kr_convert, call "
                "layer.attach(chain, name), or call layer.forward_with_repr(x, d)."
            )
        return chain.read(
            self.kr_name or type(self).__name__, batch_size, self.batch_layout, self.training
        )

    def write_repr(self, d: Tensor | None) -> None:
        if d is not None and self.chain is not None:
            self.chain.write(d, self.batch_layout)

    def forward(self, x: Tensor) -> Tensor:
        """``y`` for input ``x``; reads ``d_i`` from the chain and writes ``d_{i+1}`` back."""
        self._check_input(x)
        d = self.read_repr(x.shape[0])
        y, d_next = self.forward_with_repr(x, d)
        self.write_repr(d_next)
        return y

    @property
    def mix_scale(self) -> float:
        """``√n``: the factor of the kernel-number attention in the mixture (see the class doc)."""
        return math.sqrt(self.kernel_num)

    def kernel_mixing(self, kernel_att: Tensor | None) -> Tensor | None:
        """Mixing weights ``√n · a_kn`` (B, n) of the stored candidates, or ``None`` (n = 1)."""
        return None if kernel_att is None else kernel_att * self.mix_scale

    def static_weight(self) -> Tensor:
        """The kernel of uniform kernel-number attention: ``√n · mean_n V_n``."""
        return self.weight.mean(0) * self.mix_scale

    def load_static(self, static: nn.Module, init_noise: float) -> None:
        """Move to ``static``'s device/dtype; candidates from its weight (see
        :func:`candidates_from_static`), its bias as is."""
        self.to(device=static.weight.device, dtype=static.weight.dtype)
        with torch.no_grad():
            candidates = candidates_from_static(static.weight, self.kernel_num, init_noise)
            self.weight.copy_(candidates / self.mix_scale)
            if static.bias is not None:
                self.bias.copy_(static.bias)

    def store_static(self, static: nn.Module) -> nn.Module:
        """Write the mean of the candidates and the bias into ``static`` (same shape); return it."""
        with torch.no_grad():
            static.weight.copy_(self.static_weight())
            if self.bias is not None:
                static.bias.copy_(self.bias)
        return static

    def set_temperature(self, value: float) -> None:
        """Set the attention temperature ``T`` of this layer's kernel generator(s)."""
        for module in self.modules():
            temperature = getattr(module, "temperature", None)
            if isinstance(temperature, Tensor):
                temperature.fill_(float(value))
