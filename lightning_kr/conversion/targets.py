"""Which modules a user asks for by name: PEFT's matching rules, in one place."""

from __future__ import annotations

import re
from collections.abc import Sequence

Target = str | Sequence[str] | None
"""A string is a full regular expression on the qualified module name; a list matches each entry
exactly or as a dotted suffix (``"fc"`` matches ``"fc"`` and ``"head.fc"``); ``None`` matches
nothing."""


def matches(name: str, target: Target) -> bool:
    """Whether the qualified module name ``name`` is selected by ``target`` (see :data:`Target`)."""
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)
