"""Fixed binary layouts: named byte ranges of quote bodies and attestation reports.

The vendors' specifications give each field of a DCAP report body or an SEV-SNP
ATTESTATION_REPORT as an offset range; the verifiers keep those ranges as tables
(field name → ``[start, end)``) and read them here, so an offset is written once, next to
its name, and can be checked against the specification line by line.

Invariant: every range lies inside the input (callers check the input's size first);
integers are unsigned little-endian, as both Intel and AMD encode them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``[start, end)`` byte offsets of one field.
Span = tuple[int, int]


def read(raw: bytes, *, blobs: Mapping[str, Span] | None = None,
         uints: Mapping[str, Span] | None = None) -> dict[str, Any]:
    """The fields of ``raw`` by name: ``blobs`` as bytes, ``uints`` as unsigned
    little-endian integers (keyword arguments for a claims or report dataclass)."""
    out: dict[str, Any] = {name: raw[start:end] for name, (start, end) in (blobs or {}).items()}
    for name, (start, end) in (uints or {}).items():
        out[name] = int.from_bytes(raw[start:end], "little")
    return out
