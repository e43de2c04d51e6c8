"""What every KEK provider shares, below :mod:`.kek` and :mod:`.kek_pkcs11` (which both
import it, and never each other the other way round): the :class:`KekProvider` protocol,
the associated data that binds a wrapped model key to its model id and version, and the
check that a record is unwrapped under the KEK it names.

Invariant: every provider wraps a model key with :func:`key_aad` as associated data, so a
wrapped key copied onto another record (or another version) fails to unwrap.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..errors import KekUnavailable

_AAD_LABEL = b"sealedtorch/model-key/v1\x00"


def key_aad(model_id: str, version: int) -> bytes:
    """AES-GCM associated data for a wrapped model key: label ‖ model id ‖ 0 ‖ u32be(version).
    Model ids never contain NUL (see :func:`sealedtorch.keys.validate_model_id`)."""
    return _AAD_LABEL + model_id.encode() + b"\x00" + version.to_bytes(4, "big")


@runtime_checkable
class KekProvider(Protocol):
    """Wraps model keys for storage.  ``kek_id`` names the KEK new records are wrapped under
    (stored beside each record, so a rewrap can find what still needs moving and a reader
    knows which KEK to ask)."""

    @property
    def kek_id(self) -> str:
        """The id of the KEK new records are wrapped under (read-only: a ring's changes
        when its active KEK does)."""
        ...

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes: ...

    def wrap_with_id(self, key: bytes, *, model_id: str, version: int) -> tuple[bytes, str]:
        """Wrap, and name the KEK that did it (one consistent answer even while a
        :class:`KekRing` switches its active KEK): what a store records."""
        ...

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int,
               kek_id: str | None = None) -> bytes:
        """Unwrap a record; ``kek_id`` is the id stored with it (None: unknown)."""
        ...

    def mac(self, data: bytes) -> bytes:
        """A tag over ``data`` (a store row's canonical bytes) under a key that exists only
        inside this provider: who can write the database but not use the KEK cannot make
        one.  Tags may be randomised; check them with :meth:`verify_mac`."""
        ...

    def verify_mac(self, data: bytes, tag: bytes) -> bool:
        """True if ``tag`` was made by :meth:`mac` of this provider over ``data``."""
        ...

    def close(self) -> None: ...


def check_kek_id(provider: KekProvider, kek_id: str | None) -> None:
    """Refuse to unwrap a record that names another KEK than ``provider``'s."""
    if kek_id is not None and kek_id != provider.kek_id:
        raise KekUnavailable(f"record was wrapped under KEK {kek_id}, not {provider.kek_id}")
