"""Moved to :mod:`lightning_kr.utilities.mac_count`; this name stays for old imports."""

import warnings

from lightning_kr.utilities.mac_count import *  # noqa: F403
from lightning_kr.utilities.mac_count import __all__  # noqa: F401

warnings.warn(
    "lightning_kr.callbacks.mac_count moved to lightning_kr.utilities.mac_count; import from there",
    DeprecationWarning,
    stacklevel=2,
)
