"""The one place that asks whether a tracer, an exporter or a compiler is recording the forward.

* :func:`exporting` — ``torch.export`` (and the dynamo ONNX exporter built on it) is recording: the
  graph must hold for any batch, so only portable strategies may run
  (:func:`~lightning_kr.strategies.registry.choose` with ``portable=True``).
* :func:`counting` — the TorchScript tracer is recording (fvcore's MAC count, ``torch.jit.trace``):
  a strategy that skips work a static convolution does (taps that read only padding) counts it
  anyway, so that KR and its static model are compared on one count.
* :func:`compiling` — ``torch.compile`` (dynamo) is tracing: no Python-side state may branch on
  autograd internals (a reentrant checkpoint's ``no_grad`` pass, a recomputation in backward).
* :func:`dispatch_mode` — a Python dispatch mode (``FlopCounterMode``, ``FakeTensorMode``) sees
  every operator: inference shortcuts (the folded kernel generator) stay off, so counts are the
  model's own.
* :func:`plain_operators` — exporting or counting: custom autograd Functions cannot be recorded, so
  each strategy runs its plain-operator twin (the same computation, without recomputation in
  backward).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def exporting() -> bool:
    """``torch.export`` (ONNX) is recording this forward."""
    return torch.compiler.is_exporting()


def counting() -> bool:
    """The TorchScript tracer (fvcore's MAC counter, ``torch.jit.trace``) is recording."""
    return torch.jit.is_tracing()


def compiling() -> bool:
    """``torch.compile`` (or ``torch.export``, which compiles) is tracing this forward."""
    return torch.compiler.is_compiling()


def dispatch_mode() -> bool:
    """A Python dispatch mode sees every operator (``FlopCounterMode``, ``FakeTensorMode``): run
    the model's own operators, not an equivalent shortcut."""
    return is_in_torch_dispatch_mode()


def plain_operators() -> bool:
    """A tracer or exporter is recording: run plain operators, not custom autograd Functions."""
    return counting() or exporting()
