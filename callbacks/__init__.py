"""Lightning callbacks for KR models, importable as ``lightning_kr.callbacks``.

Each works with any ``LightningModule`` that contains a model converted by ``kr_convert`` (and, for
``FlopsOverhead`` and the features of ``KernelEmbeddings``, with any model at all), under
single-device and multi-process DDP training alike.
"""

# The MAC counter FlopsOverhead runs, importable from here as before.
from lightning_kr.utilities.mac_count import MacCount, MacOverhead, count_macs, count_overhead

from .attention_monitor import AttentionMonitor
from .checkpoint_on_sigterm import CheckpointOnSigterm
from .finite_loss import NonFiniteLossError, StopOnNonFiniteLoss
from .flops_overhead import FlopsOverhead
from .kernel_embeddings import KernelEmbeddings
from .temperature_annealing import TemperatureAnnealing

__all__ = [
    "AttentionMonitor",
    "CheckpointOnSigterm",
    "FlopsOverhead",
    "KernelEmbeddings",
    "MacCount",
    "MacOverhead",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
    "TemperatureAnnealing",
    "count_macs",
    "count_overhead",
]
