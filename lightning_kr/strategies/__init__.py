"""How a batch of per-sample kernels is convolved: one file per strategy, one registry.

Every strategy computes ``y_b = a_f[b] ⊙ conv(a_c[b] ⊙ x_b, K_b) + bias`` with
``K_b = sum_n a_kn[b, n] · a_s[b] ⊙ W_n`` (``docs/method.md``) and declares what it applies to,
its cost, whether ``torch.export`` can record it, and its computation
(:class:`~lightning_kr.strategies.base.ConvStrategy`):

========================  ====  ==========================================================  ========
strategy                  dims  for                                                         portable
========================  ====  ==========================================================  ========
``shared``                2, 3  no per-sample kernel: one ordinary convolution              yes
``candidate_outputs``     2     convolve with all candidates, mix the outputs (small maps)  no
``taps``                  2     stride 1, groups 1: one GEMM over the taps, shifted sums    yes
``conv_columns``          2     one-hot columns (a convolution), batched product (export)   yes
``tap_scaled``            2     n = 1: spatial attention on the im2col columns              yes
``unfold``                2     im2col columns and a batched product with the kernels       yes
``folded``                2     all attentions folded into a ``groups = B`` convolution     no
``grouped``               2, 3  per-sample kernels as one ``groups = B`` convolution        no
``reference``             2, 3  the textbook method (benchmark baseline, never ``auto``)    no
``tap_products``          3     per-sample kernels tap by tap (what export runs in 3-D)     yes
========================  ====  ==========================================================  ========

``"auto"`` runs the cheapest strategy that applies (:func:`~lightning_kr.strategies.registry.choose`),
``torch.export`` the cheapest portable one for any batch; whether a tracer or exporter is recording
is asked in one place (:mod:`~lightning_kr.strategies.tracing`). The 2-D and 3-D entry points are
:func:`~lightning_kr.layers.dynamic_conv.dynamic_conv2d` and
:func:`~lightning_kr.layers.dynamic_conv3d.dynamic_conv3d`.
"""

from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.geometry import ConvAttentions, ConvGeometry
from lightning_kr.strategies.registry import REGISTRY, choose, get, names, select, strategies

__all__ = [
    "REGISTRY",
    "ConvAttentions",
    "ConvGeometry",
    "ConvStrategy",
    "choose",
    "get",
    "names",
    "select",
    "strategies",
]
