"""Row MACs: the store rows that decide who gets a key, authenticated under the KEK.

A wrapped model key is bound to its model id and version by the AEAD, but what decides
*who* gets it lives in plain rows: the model's policy (and its digest column), the model's
owner, a key version's state, and the admin tokens that may change all of these.  Someone
who can write the database but does not hold the KEK (a database administrator, a stolen
backup restored with edits, an SQL injection elsewhere on the host) could otherwise rewrite
a policy to admit their own runtime, un-revoke a key, move a model to their owner identity,
or insert an admin token of their own.

Each such row carries ``row_mac``: a MAC over a canonical encoding of the columns that
matter, made by the KEK provider (:meth:`~.kek_base.KekProvider.mac`) with a key that exists
only inside it: an HMAC-SHA256 key derived from a file KEK, or GMAC by the HSM with the
PKCS#11 KEK itself.  ``mac_kek`` names the KEK that made it, so ``keyserver rewrap`` can
move MACs to a new KEK like wrapped keys.  The keyserver checks the MAC every time it
reads a row to decide something and refuses a row that fails (or has none) with
:class:`~sealedtorch.errors.StoreIntegrityError`; the service audits the refusal and
counts it in ``sealedtorch_keyserver_store_integrity_failures_total``.

Checks are cheap after the first: a verified (row bytes, tag) pair is remembered in this
process, so the release path costs a SHA-256 per row rather than an HSM call.

What row MACs do not stop: deleting rows (a denial of service), and *rolling a row back* to
an earlier state that carried a valid MAC (e.g. a token row from before its revocation);
the transparency log is what shows such history rewrites to anyone keeping checkpoints.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, TypeVar

from .. import crypto
from ..errors import KekUnavailable, StoreIntegrityError
from .kek import KekRing
from .kek_base import KekProvider
from .protocol import canonical_json
from .store import AdminTokenRecord, KeyRecord, ModelRecord

_Row = TypeVar("_Row", ModelRecord, KeyRecord, AdminTokenRecord)

log = logging.getLogger("sealedtorch.keyserver")

_LABEL = "sealedtorch/keyserver/row/v1"
#: meta key recording that this store's rows are sealed (written with a MAC of its own)
META_KEY = "row_macs"
_CACHE_MAX = 100_000


def model_bytes(m: ModelRecord) -> bytes:
    """What a model row's MAC covers: id, policy (as stored), its digest, owner name, id."""
    return canonical_json([_LABEL, "models", m.model_id, canonical_json(m.policy).decode(),
                           m.policy_digest, m.owner, m.owner_id])


def key_bytes(k: KeyRecord) -> bytes:
    """A key version row: model, version and state (the wrapped key has its own AEAD)."""
    return canonical_json([_LABEL, "key_versions", k.model_id, k.version, k.state.value])


def token_bytes(t: AdminTokenRecord) -> bytes:
    """An admin token row: every column that decides what the token may do, and until
    when."""
    return canonical_json([_LABEL, "admin_tokens", t.token_id,
                           t.token_hash.hex() if t.token_hash is not None else None,
                           t.name, t.role, t.principal_id, t.created_at, t.expires_at,
                           t.revoked_at, t.rotated_from])


def marker_bytes() -> bytes:
    return canonical_json([_LABEL, "meta", META_KEY, "sealed"])


class RowIntegrity:
    """Seals rows before they are written and checks them when they are read."""

    def __init__(self, kek: KekProvider | KekRing, *, on_failure: Any = None) -> None:
        self.kek = kek
        self._on_failure = on_failure  # called with the table name of each refused row
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    # --- primitives ---------------------------------------------------------------------
    def tag(self, data: bytes) -> tuple[bytes, str]:
        """(MAC, kek id) under the active KEK."""
        if isinstance(self.kek, KekRing):
            return self.kek.mac_with_id(data)
        return self.kek.mac(data), self.kek.kek_id

    def _sealed(self, row: _Row, data: bytes) -> _Row:
        """``row`` with the tag over its canonical bytes ``data`` (and the KEK that made it)."""
        tag, kek_id = self.tag(data)
        return replace(row, row_mac=tag, mac_kek=kek_id)

    def valid(self, data: bytes, tag: bytes | None, kek_id: str | None) -> bool:
        """True if ``tag`` is a MAC over ``data`` made by the KEK ``kek_id``."""
        if tag is None or kek_id is None:
            return False
        memo = crypto.sha256(data, b"\x00", kek_id.encode(), b"\x00", tag)
        if memo in self._verified:
            return True
        if isinstance(self.kek, KekRing):
            ok = self.kek.verify_mac(data, tag, kek_id)
        elif kek_id != self.kek.kek_id:
            raise KekUnavailable(f"row was sealed under KEK {kek_id}, not {self.kek.kek_id}")
        else:
            ok = self.kek.verify_mac(data, tag)
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_MAX:
                    self._verified.clear()
                self._verified.add(memo)
        return ok

    def _refuse(self, table: str, what: str, tag: bytes | None) -> StoreIntegrityError:
        if self._on_failure is not None:
            self._on_failure(table)
        why = "has no MAC" if tag is None else "fails its MAC under the KEK"
        log.error("store integrity: %s row %s %s: changed behind the keyserver's back",
                  table, what, why, extra={"fields": {"table": table, "row": what}})
        return StoreIntegrityError(f"the store's {table} row for {what} {why} (it was "
                                   f"inserted or changed behind the keyserver's back); "
                                   f"refused", table=table)

    # --- models -------------------------------------------------------------------------
    def seal_model(self, m: ModelRecord) -> ModelRecord:
        return self._sealed(m, model_bytes(m))

    def check_model(self, m: ModelRecord) -> ModelRecord:
        if not self.valid(model_bytes(m), m.row_mac, m.mac_kek):
            raise self._refuse("models", repr(m.model_id), m.row_mac)
        return m

    # --- key versions ---------------------------------------------------------------------
    def seal_key(self, k: KeyRecord) -> KeyRecord:
        return self._sealed(k, key_bytes(k))

    def check_key(self, k: KeyRecord) -> KeyRecord:
        if not self.valid(key_bytes(k), k.row_mac, k.mac_kek):
            raise self._refuse("key_versions", f"{k.model_id!r} version {k.version}",
                               k.row_mac)
        return k

    # --- admin tokens ---------------------------------------------------------------------
    def seal_token(self, t: AdminTokenRecord) -> AdminTokenRecord:
        return self._sealed(t, token_bytes(t))

    def check_token(self, t: AdminTokenRecord) -> AdminTokenRecord:
        if not self.valid(token_bytes(t), t.row_mac, t.mac_kek):
            raise self._refuse("admin_tokens", t.token_id, t.row_mac)
        return t

    def token_ok(self, t: AdminTokenRecord) -> bool:
        """Quietly: does this token row verify (for listings and counts)?"""
        return self.valid(token_bytes(t), t.row_mac, t.mac_kek)

    # --- the store-wide marker --------------------------------------------------------------
    def marker(self) -> str:
        tag, kek_id = self.tag(marker_bytes())
        return f"{kek_id} {tag.hex()}"

    def marker_ok(self, value: str | None) -> bool:
        if not value or " " not in value:
            return False
        kek_id, _, tag_hex = value.partition(" ")
        try:
            tag = bytes.fromhex(tag_hex)
        except ValueError:
            return False
        return self.valid(marker_bytes(), tag, kek_id)


def seal_all(tx: Any, rows: RowIntegrity, *, only_unsealed: bool) -> int:
    """MAC every row of the store (``only_unsealed``: those without a MAC: the
    trust-on-upgrade step; else every row whose MAC is valid is re-made under the active
    KEK, for ``keyserver rewrap``).  Returns how many rows were sealed."""
    n = 0
    target = rows.kek.kek_id
    for m in tx.list_models():
        if _wanted(rows, model_bytes(m), m.row_mac, m.mac_kek, target, only_unsealed):
            sealed = rows.seal_model(m)
            tx.set_row_mac("models", (m.model_id,), sealed.row_mac, sealed.mac_kek)
            n += 1
    for k in tx.all_key_versions():
        if _wanted(rows, key_bytes(k), k.row_mac, k.mac_kek, target, only_unsealed):
            sealed_k = rows.seal_key(k)
            tx.set_row_mac("key_versions", (k.model_id, k.version), sealed_k.row_mac,
                           sealed_k.mac_kek)
            n += 1
    for t in tx.list_admin_tokens():
        if _wanted(rows, token_bytes(t), t.row_mac, t.mac_kek, target, only_unsealed):
            sealed_t = rows.seal_token(t)
            tx.set_row_mac("admin_tokens", (t.token_id,), sealed_t.row_mac, sealed_t.mac_kek)
            n += 1
    return n


def _wanted(rows: RowIntegrity, data: bytes, tag: bytes | None, kek_id: str | None,
            target: str, only_unsealed: bool) -> bool:
    if only_unsealed:
        return tag is None
    # rewrap: move only rows that verify now (never bless a row someone changed)
    return tag is not None and kek_id != target and rows.valid(data, tag, kek_id)
