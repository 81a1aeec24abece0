"""The recomputing autograd Functions, now beside their strategies in :mod:`lightning_kr.strategies`.

Kept so that imports from here still work: :class:`TapsConv` (``strategies/taps.py``),
:class:`UnfoldConv` (``strategies/unfold.py``), :class:`FoldedGroupedConv`
(``strategies/folded.py``); chunking in ``strategies/memory.py``.
"""

from lightning_kr.strategies.folded import FoldedGroupedConv
from lightning_kr.strategies.geometry import tap_offsets, tap_windows
from lightning_kr.strategies.memory import CHUNK_BYTES, batch_chunks
from lightning_kr.strategies.taps import TapsConv
from lightning_kr.strategies.unfold import UnfoldConv

__all__ = [
    "CHUNK_BYTES",
    "FoldedGroupedConv",
    "TapsConv",
    "UnfoldConv",
    "batch_chunks",
    "tap_offsets",
    "tap_windows",
]
