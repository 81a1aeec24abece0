"""What a per-sample convolution strategy declares: what it is for, what it costs, how it computes.

A strategy is one way to compute ``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias`` for a whole
batch, where ``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n`` (``docs/method.md``). Every strategy computes
the same function; they differ in speed and memory. A subclass sets

* :attr:`~ConvStrategy.name` and :attr:`~ConvStrategy.dims` — the kernel ranks it handles (2: 2-D
  convolutions, and 1-D ones run as height-1 maps; 3: video);
* :meth:`~ConvStrategy.applies` — ``None``, or why it cannot compute a geometry;
* :meth:`~ConvStrategy.cost` — its estimated cost in multiply-adds per sample (what ``"auto"``
  minimises), or ``None`` where it is not a contender;
* :attr:`~ConvStrategy.portable` — it holds for any batch in plain operators, so ``torch.export``
  (ONNX) can record it;
* :meth:`~ConvStrategy.convolve` — the computation (usually an autograd Function that recomputes in
  backward, and its plain-operator twin for tracers, side by side in the strategy's file).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry


class ConvStrategy:
    """Base of the per-sample convolution strategies (see the module docstring)."""

    name: ClassVar[str]
    dims: ClassVar[frozenset[int]]
    portable: ClassVar[bool] = False
    folds_attentions: ClassVar[bool] = False
    """True: :meth:`convolve` takes channel and filter attention and the bias itself (into the
    kernel); otherwise they scale the input and the output around it."""

    def applies(self, geometry: ConvGeometry) -> str | None:
        """``None`` where this strategy can compute ``geometry``; else what it needs, completing
        "strategy '<name>' needs …"."""
        return None

    def cost(self, geometry: ConvGeometry) -> float | None:
        """Estimated cost of one sample in multiply-adds (``geometry.batch`` is ``None`` under
        ``torch.export``); ``None``: never chosen automatically here. Ties go to the strategy
        listed first in the registry."""
        return None

    def convolve(
        self,
        x: Tensor,
        weight: Tensor,
        att: ConvAttentions,
        bias: Tensor | None,
        geometry: ConvGeometry,
    ) -> Tensor:
        """``conv(x_b, K_b)`` (B, C_out, *out_size) for input ``x`` (B, C_in, *in_size), with
        the channel attention already applied unless :attr:`folds_attentions`."""
        raise NotImplementedError

    def __call__(
        self,
        x: Tensor,
        weight: Tensor,
        att: ConvAttentions,
        bias: Tensor | None,
        geometry: ConvGeometry,
    ) -> Tensor:
        """``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias`` for every sample at once."""
        if self.folds_attentions:
            return self.convolve(x, weight, att, bias, geometry)
        trailing = (None,) * geometry.dims
        if att.channel is not None:
            x = x * att.channel.to(x.dtype)[(slice(None), slice(None), *trailing)]
        y = self.convolve(x, weight, att, None, geometry)
        if att.filter is not None:
            y = y * att.filter.to(y.dtype)[(slice(None), slice(None), *trailing)]
        if bias is not None:
            y = y + bias.to(y.dtype)[(None, slice(None), *trailing)]
        return y

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}>"
