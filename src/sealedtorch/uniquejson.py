"""JSON in which a key given twice is an error, not "the last one wins".

Two readers of one authentic document (a sealed file's header, a policy) could otherwise
see two different values for the same field; every parser that guards a trust decision
reads through here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["loads"]


def loads(text: str | bytes, *,
          error: Callable[[str], Exception] = ValueError) -> Any:
    """``json.loads`` that raises ``error("duplicate key 'k'")`` for a repeated key in any
    object.  Malformed JSON raises :class:`json.JSONDecodeError` (a ``ValueError``)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"duplicate key {key!r}")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=unique)
