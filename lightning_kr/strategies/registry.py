"""The strategies, in one table, and how one is picked for a call.

Adding a strategy is one file (a :class:`~lightning_kr.strategies.base.ConvStrategy`) and one line
in :data:`REGISTRY`. ``"auto"`` takes the cheapest applicable strategy (:func:`choose`); under
``torch.export`` every layer takes the cheapest portable one for any batch, whatever was asked
(the exported graph must serve every batch size). Where two costs are equal, the strategy listed
first wins.
"""

from __future__ import annotations

import warnings

from lightning_kr.strategies import tracing
from lightning_kr.strategies.base import ConvStrategy
from lightning_kr.strategies.candidate_outputs import CandidateOutputs
from lightning_kr.strategies.conv_columns import ConvColumns
from lightning_kr.strategies.folded import Folded
from lightning_kr.strategies.geometry import ConvGeometry
from lightning_kr.strategies.grouped import Grouped
from lightning_kr.strategies.reference import Reference
from lightning_kr.strategies.shared import Shared
from lightning_kr.strategies.tap_products import TapProducts
from lightning_kr.strategies.tap_scaled import TapScaled
from lightning_kr.strategies.taps import Taps
from lightning_kr.strategies.unfold import Unfold

REGISTRY: tuple[ConvStrategy, ...] = (
    Shared(),
    CandidateOutputs(),
    Taps(),
    ConvColumns(),
    TapScaled(),
    Unfold(),
    Folded(),
    Grouped(),
    Reference(),
    TapProducts(),
)
"""Every strategy, in the order that breaks ties of cost."""

RENAMED: dict[int, dict[str, str]] = {3: {"taps": "tap_products"}}
"""Old names still accepted, per kernel rank: the 3-D ``"taps"`` (per-tap matrix products) is not
the 2-D ``"taps"`` (one GEMM and shifted sums) and was renamed."""


def strategies(dims: int) -> tuple[ConvStrategy, ...]:
    """The strategies for kernels of rank ``dims`` (2: 2-D and 1-D layers; 3: 3-D), in order."""
    return tuple(s for s in REGISTRY if dims in s.dims)


def names(dims: int | None = None) -> tuple[str, ...]:
    """Names of the strategies for rank ``dims`` (every strategy for ``None``)."""
    return tuple(s.name for s in (REGISTRY if dims is None else strategies(dims)))


def resolve_name(name: str, dims: int) -> str:
    """``name`` with a renamed strategy's old name replaced (with a warning)."""
    new = RENAMED.get(dims, {}).get(name)
    if new is None:
        return name
    warnings.warn(
        f"strategy {name!r} of {dims}-D convolutions is now called {new!r}",
        FutureWarning,
        stacklevel=4,
    )
    return new


def get(name: str, dims: int) -> ConvStrategy:
    """The strategy ``name`` for kernels of rank ``dims``; ValueError for an unknown name."""
    for strategy in strategies(dims):
        if strategy.name == name:
            return strategy
    raise ValueError(f"unknown strategy {name!r}; choose from {('auto', *names(dims))}")


CHOICES_KEPT = 4096
"""Choices :func:`choose` remembers (a model has a few dozen geometries per input size)."""
_choices: dict[tuple[tuple[ConvStrategy, ...], ConvGeometry, bool], ConvStrategy] = {}


def choose(geometry: ConvGeometry, portable: bool = False) -> ConvStrategy:
    """The cheapest strategy that applies to ``geometry`` (among the portable ones if asked).

    Costs depend on the geometry alone, so a choice is remembered per geometry (and registry):
    a call then pays a dictionary lookup instead of every strategy's cost (about 25 µs per KR
    layer and call, which a batch-1 forward notices). Under ``torch.compile`` the choice is made
    afresh (it is traced once)."""
    if tracing.compiling():
        return _cheapest(geometry, portable)
    key = (REGISTRY, geometry, portable)
    chosen = _choices.get(key)
    if chosen is None:
        chosen = _cheapest(geometry, portable)
        if len(_choices) >= CHOICES_KEPT:
            _choices.clear()
        _choices[key] = chosen
    return chosen


def _cheapest(geometry: ConvGeometry, portable: bool) -> ConvStrategy:
    best, best_cost = None, None
    for strategy in strategies(geometry.dims):
        if (portable and not strategy.portable) or strategy.applies(geometry) is not None:
            continue
        cost = strategy.cost(geometry)
        if cost is not None and (best_cost is None or cost < best_cost):
            best, best_cost = strategy, cost
    if best is None:
        raise ValueError(f"no strategy applies to {geometry}")
    return best


def select(name: str, geometry: ConvGeometry) -> ConvStrategy:
    """The strategy a call runs: the cheapest portable one under ``torch.export``, the cheapest
    applicable one for ``"auto"``, else ``name`` where it applies (ValueError saying what it needs
    where not)."""
    if tracing.exporting():
        return choose(geometry.any_batch(), portable=True)
    if name == "auto":
        return choose(geometry)
    strategy = get(resolve_name(name, geometry.dims), geometry.dims)
    need = strategy.applies(geometry)
    if need is not None:
        raise ValueError(f"strategy {name!r} needs {need}")
    return strategy
