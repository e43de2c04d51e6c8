"""The transparency log: audit records as leaves of an append-only Merkle tree.

Why: the audit chain (:mod:`.audit`) is unkeyed, so a database writer who drops the
triggers can rewrite, reorder or truncate it and recompute every hash.  A Merkle tree whose
heads (*checkpoints*) are signed with a key that is **not** in the database turns that into
a detectable fork: anyone who kept an earlier checkpoint can ask for a consistency proof,
and every key release carries a *receipt* (leaf index, checkpoint, inclusion proof) that
the keycache checks before it uses the key.

- Hashing is RFC 9162 §2.1.1: leaf = SHA-256(0x00 ‖ record bytes), node = SHA-256(0x01 ‖
  left ‖ right); a record's bytes are its canonical JSON (the audit record unchanged), and
  leaf index = ``seq - 1``.
- Storage is O(log n) per append and per proof: the store keeps the hash of every
  *complete* subtree (``tlog_nodes``: level, index, hash; node (l, i) covers leaves
  [i·2^l, (i+1)·2^l)), written in the same transaction as the audit record, under the same
  writer lock.  Any range hash needed by a proof is a right fold of at most log n stored
  nodes; a proof reads its nodes in one query.
- Proofs are RFC 9162 §2.1.3 (inclusion) and §2.1.4 (consistency), with the verifiers of
  §2.1.3.2 / §2.1.4.2.
- Checkpoints are C2SP tlog-checkpoint bodies (origin, decimal size, base64 root) in a C2SP
  signed note, signed with Ed25519; the key ID is SHA-256(name ‖ 0x0A ‖ 0x01 ‖ key)[:4].
  The signer key lives in ``DIR/tlog-signing.key`` (mode 0600) in the Go ``note`` signer
  format (``PRIVATE+KEY+name+id+base64(0x01 ‖ seed)``), so existing tooling reads both the
  key and the notes; its verifier key (``name+id+base64(0x01 ‖ public key)``) is public.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import crypto, secretfile
from ..errors import ConfigError, IntegrityError, LogInconsistent, TransparencyError

log = logging.getLogger("sealedtorch.keyserver.tlog")

#: The signer key file in a keyserver data directory.
SIGNER_FILE = "tlog-signing.key"
#: Where the store remembers the log's verifier key (public; replicas must agree).
META_VKEY = "tlog_verifier_key"
#: Signature type byte of Ed25519 in C2SP signed notes.
ED25519_TYPE = 0x01
_EM_DASH_PREFIX = "\u2014 "
_MAX_NOTE = 64 * 1024
_MAX_PROOF = 128


# ----------------------------------------------------------------------- tree arithmetic

def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n ≥ 2): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The complete subtrees (level, index) whose right fold is MTH(D[start:end]), left to
    right.  ``start`` must be aligned to the largest of them, as every range of the RFC
    9162 recursion is."""
    out: list[tuple[int, int]] = []
    while start < end:
        level = (end - start).bit_length() - 1
        size = 1 << level
        if start % size:
            raise ValueError(f"range [{start}, {end}) is not aligned")
        out.append((level, start >> level))
        start += size
    return out


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTH make up PATH(index, D[0:size]), in proof order."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    out.reverse()
    return out


def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTH make up PROOF(first, D[0:second]) (RFC 9162 §2.1.4.1)."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to {second}")
    if first in (0, second):
        return []
    out: list[tuple[int, int]] = []
    lo, hi, m, whole = 0, second, first, True
    while True:
        if m == hi - lo:
            if not whole:
                out.append((lo, hi))
            break
        k = _split(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            m -= k
            whole = False
    out.reverse()
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """Right fold of complete-subtree hashes: H(h1, H(h2, … hk))."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = crypto.merkle_node_hash(h, acc)
    return acc


EMPTY_ROOT = crypto.sha256()  # MTH({}) = SHA-256() (RFC 9162 §2.1.1)


# ----------------------------------------------------------------------- storage access

class NodeStore(Protocol):
    """What the tree needs from a store transaction (see :class:`~.store.SqlTx`)."""

    def tlog_size(self) -> int: ...
    def tlog_nodes(self, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]: ...
    def tlog_put_nodes(self, nodes: Sequence[tuple[int, int, bytes]]) -> None: ...


def _fetch(tx: NodeStore, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    want = sorted(set(coords))
    got = tx.tlog_nodes(want) if want else {}
    missing = [c for c in want if c not in got]
    if missing:
        raise IntegrityError(f"transparency log: stored tree lacks node(s) {missing[:4]} "
                             f"(the tlog_nodes table was damaged or truncated)")
    return got


def append_leaf(tx: NodeStore, index: int, leaf: bytes) -> None:
    """Store leaf ``index`` (which must be the next one) and every subtree it completes:
    O(log n) rows read and written, in the caller's write transaction."""
    ones = (~index & (index + 1)).bit_length() - 1  # trailing one bits of index
    siblings = [(level, (index >> level) - 1) for level in range(ones)]
    got = _fetch(tx, siblings)
    rows = [(0, index, leaf)]
    acc = leaf
    for level, sib in siblings:
        acc = crypto.merkle_node_hash(got[(level, sib)], acc)
        rows.append((level + 1, (sib + 1) >> 1, acc))
    tx.tlog_put_nodes(rows)


def _range_hashes(tx: NodeStore, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    parts = [subtrees(a, b) for a, b in ranges]
    got = _fetch(tx, (c for p in parts for c in p))
    return [fold([got[c] for c in p]) for p in parts]


def root(tx: NodeStore, size: int) -> bytes:
    """MTH of the first ``size`` leaves."""
    if size == 0:
        return EMPTY_ROOT
    return _range_hashes(tx, [(0, size)])[0]


def inclusion_proof(tx: NodeStore, index: int, size: int) -> list[bytes]:
    return _range_hashes(tx, inclusion_ranges(index, size))


def consistency_proof(tx: NodeStore, first: int, second: int) -> list[bytes]:
    return _range_hashes(tx, consistency_ranges(first, second))


# ----------------------------------------------------------------------- verifiers

def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                     expected_root: bytes) -> None:
    """RFC 9162 §2.1.3.2; raises :class:`TransparencyError` unless ``proof`` leads from
    ``leaf`` at ``index`` to ``expected_root`` of a tree of ``size`` leaves."""
    if not 0 <= index < size:
        raise TransparencyError(f"inclusion proof: leaf {index} is outside a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise TransparencyError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = crypto.merkle_node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = crypto.merkle_node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TransparencyError("inclusion proof is too short for the tree size")
    if not crypto.constant_time_equal(r, expected_root):
        raise TransparencyError(f"inclusion proof of leaf {index} does not lead to the "
                                f"signed root of size {size}")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2; raises :class:`LogInconsistent` unless the tree of ``second``
    leaves with ``second_root`` extends the tree of ``first`` leaves with ``first_root``."""
    if first > second:
        raise LogInconsistent(f"the log shrank from {first} to {second} leaves (truncated)")
    if first == second:
        if proof or not crypto.constant_time_equal(first_root, second_root):
            raise LogInconsistent(f"two different roots for the same size {first} (fork)")
        return
    if first == 0:
        if proof:
            raise LogInconsistent("a consistency proof from the empty tree must be empty")
        return
    path = list(proof)
    if first & (first - 1) == 0:  # exact power of two: the old root is a node of the new
        path.insert(0, first_root)
    if not path:
        raise LogInconsistent(f"empty consistency proof from {first} to {second}")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise LogInconsistent("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = crypto.merkle_node_hash(c, fr)
            sr = crypto.merkle_node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = crypto.merkle_node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or not crypto.constant_time_equal(fr, first_root) or \
            not crypto.constant_time_equal(sr, second_root):
        raise LogInconsistent(f"the checkpoint of size {second} is not an extension of the "
                              f"one of size {first}: the log's history was rewritten or "
                              f"forked")


# ----------------------------------------------------------------------- signed notes

_NAME = re.compile(r"^[^\s+]+$")


def _check_name(name: str) -> str:
    if not name or not _NAME.match(name) or any(ord(c) < 0x20 for c in name):
        raise ConfigError(f"log key name {name!r}: must be non-empty, without spaces or '+'")
    return name


def key_id(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note key ID: SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]."""
    return crypto.sha256(name.encode(), b"\n", bytes([ED25519_TYPE]), public_key)[:4]


@dataclass(frozen=True)
class Verifier:
    """A signed-note verifier key: ``name+hex(id)+base64(0x01 ‖ public key)``."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @property
    def vkey(self) -> str:
        return (f"{self.name}+{self.key_id.hex()}+"
                f"{_b64(bytes([ED25519_TYPE]) + self.public_key)}")

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        parts = str(vkey).strip().split("+", 2)
        try:
            name, hexid, material = parts
            raw = base64.b64decode(material, validate=True)
            kid = bytes.fromhex(hexid)
        except (ValueError, binascii.Error):
            raise TransparencyError(f"not a signed-note verifier key: {str(vkey)[:80]!r}"
                                    ) from None
        if len(raw) != 33 or raw[0] != ED25519_TYPE or len(hexid) != 8 or not name \
                or not _NAME.match(name):
            raise TransparencyError(f"verifier key {name!r}: not an Ed25519 signed-note key")
        v = cls(name, raw[1:])
        if v.key_id != kid:
            raise TransparencyError(f"verifier key {name!r}: key ID does not match the key")
        return v


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Signer:
    """The log's Ed25519 signing key and its name (= the checkpoints' origin)."""

    name: str
    key: crypto.SigningKey = field(repr=False)

    @classmethod
    def generate(cls, name: str | None = None) -> Signer:
        key = crypto.SigningKey.generate()
        if name is None:
            name = f"sealedtorch.keyserver/{crypto.sha256(key.public_bytes).hex()[:16]}"
        return cls(_check_name(name), key)

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.key.public_bytes)

    def skey(self) -> str:
        """The Go ``note`` signer key text (a secret: goes only into a 0600 file)."""
        v = self.verifier
        return (f"PRIVATE+KEY+{self.name}+{v.key_id.hex()}+"
                f"{_b64(bytes([ED25519_TYPE]) + crypto.ed25519_seed(self.key))}")

    @classmethod
    def from_skey(cls, text: str) -> Signer:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ConfigError("not a signed-note signer key (PRIVATE+KEY+name+id+key)")
        name, hexid, material = parts[2], parts[3], parts[4]
        try:
            raw = base64.b64decode(material, validate=True)
        except (ValueError, binascii.Error):
            raise ConfigError("signed-note signer key: key material is not base64") from None
        if len(raw) != 33 or raw[0] != ED25519_TYPE:
            raise ConfigError("signed-note signer key: not an Ed25519 key")
        signer = cls(_check_name(name), crypto.ed25519_from_seed(raw[1:]))
        if signer.verifier.key_id.hex() != hexid.lower():
            raise ConfigError("signed-note signer key: key ID does not match the key")
        return signer

    def sign_note(self, text: str) -> str:
        """``text`` (ending in a newline) as a signed note with this key's signature."""
        _check_text(text)
        sig = self.key.sign(text.encode())
        return f"{text}\n{_EM_DASH_PREFIX}{self.name} {_b64(self.verifier.key_id + sig)}\n"


def _check_text(text: str) -> None:
    if not text.endswith("\n") or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise TransparencyError("note text must end in a newline and hold no control "
                                "characters")


def open_note(note: str, verifier: Verifier) -> str:
    """The text of a signed note that ``verifier`` signed (C2SP signed-note rules: the
    text ends at the last blank line; signatures of unknown keys are ignored; one bad
    signature of the known key rejects the note)."""
    if not isinstance(note, str) or len(note) > _MAX_NOTE:
        raise TransparencyError("signed note is missing or too large")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise TransparencyError("signed note holds control characters")
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise TransparencyError("not a signed note (no blank line before the signatures)")
    text, sigs = note[:cut + 1], note[cut + 2:]
    verified = False
    lines = sigs[:-1].split("\n")
    if len(lines) > 100:
        raise TransparencyError("signed note has too many signatures")
    for line in lines:
        if not line.startswith(_EM_DASH_PREFIX):
            raise TransparencyError("malformed signature line in signed note")
        name, _, b64sig = line[len(_EM_DASH_PREFIX):].partition(" ")
        try:
            blob = base64.b64decode(b64sig, validate=True)
        except (ValueError, binascii.Error):
            raise TransparencyError("signature line in signed note is not base64") from None
        if len(blob) < 5:
            raise TransparencyError("signature in signed note is too short")
        if name != verifier.name or blob[:4] != verifier.key_id:
            continue  # an unknown key (a witness's cosignature, say): ignored
        if not crypto.ed25519_verify(verifier.public_key, blob[4:], text.encode()):
            raise TransparencyError(f"the signature of {verifier.name} on the note does "
                                    f"not verify (the note was altered or forged)")
        verified = True
    if not verified:
        raise TransparencyError(f"the note carries no signature of {verifier.name}")
    return text


# ----------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash (and extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        body = f"{self.origin}\n{self.size}\n{_b64(self.root)}\n"
        return body + "".join(f"{e}\n" for e in self.extensions)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise TransparencyError("checkpoint body needs origin, size and root lines")
        origin, size, root_b64 = lines[0], lines[1], lines[2]
        if not origin:
            raise TransparencyError("checkpoint has an empty origin line")
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size):
            raise TransparencyError(f"checkpoint tree size {size[:24]!r} is not a decimal "
                                    f"number")
        try:
            root_hash = base64.b64decode(root_b64, validate=True)
        except (ValueError, binascii.Error):
            raise TransparencyError("checkpoint root hash is not base64") from None
        if len(root_hash) != crypto.MERKLE_HASH_SIZE:
            raise TransparencyError("checkpoint root hash is not 32 bytes")
        extensions = tuple(lines[3:-1])
        if any(not e for e in extensions):
            raise TransparencyError("checkpoint has an empty extension line")
        return cls(origin, int(size), root_hash, extensions)


def open_checkpoint(note: str, verifier: Verifier) -> Checkpoint:
    """Verify a signed checkpoint and return its body (its origin must be the key name)."""
    cp = Checkpoint.parse(open_note(note, verifier))
    if cp.origin != verifier.name:
        raise TransparencyError(f"checkpoint origin {cp.origin!r} is not the log "
                                f"{verifier.name!r}")
    return cp


def _b64list(hashes: Sequence[bytes]) -> list[str]:
    return [_b64(h) for h in hashes]


def decode_hashes(items: Any, *, what: str) -> list[bytes]:
    """A JSON list of base64 32-byte hashes, or :class:`TransparencyError`."""
    if not isinstance(items, list) or len(items) > _MAX_PROOF:
        raise TransparencyError(f"{what}: expected a list of at most {_MAX_PROOF} hashes")
    out = []
    for item in items:
        try:
            raw = base64.b64decode(item, validate=True)
        except (ValueError, binascii.Error, TypeError):
            raise TransparencyError(f"{what}: not base64") from None
        if len(raw) != crypto.MERKLE_HASH_SIZE:
            raise TransparencyError(f"{what}: a hash is not 32 bytes")
        out.append(raw)
    return out


# ----------------------------------------------------------------------- the keyserver side

def load_or_create_signer(data_dir: Path) -> Signer:
    """The log's signer from ``DIR/tlog-signing.key``, created (0600) if this data directory
    predates the transparency log."""
    path = Path(data_dir) / SIGNER_FILE
    if not path.exists():
        signer = Signer.generate()
        secretfile.write_new(path, (signer.skey() + "\n").encode(),
                             what="the transparency-log signing key")
        log.warning("created the transparency-log signing key %s (verifier key %s)", path,
                    signer.verifier.vkey)
        return signer
    raw = secretfile.read_private(path, what="the transparency-log signing key",
                                  error=ConfigError)
    try:
        return Signer.from_skey(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a signed-note signer key") from None


class TransparencyLog:
    """The keyserver's log: signs checkpoints of the tree its store keeps, builds receipts
    and proofs from one consistent snapshot."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._cache_lock = threading.Lock()
        self._cached: tuple[int, bytes, str] | None = None

    @property
    def verifier(self) -> Verifier:
        return self.signer.verifier

    def checkpoint(self, tx: NodeStore) -> tuple[Checkpoint, str]:
        """The signed checkpoint of the tree as ``tx`` sees it."""
        size = tx.tlog_size()
        return self._signed(size, root(tx, size))

    def _signed(self, size: int, root_hash: bytes) -> tuple[Checkpoint, str]:
        """Sign (size, root); the last note is reused while the tree has not grown (an
        Ed25519 signature is deterministic, so this changes no byte)."""
        cp = Checkpoint(self.signer.name, size, root_hash)
        with self._cache_lock:
            cached = self._cached
        if cached is not None and cached[0] == size and cached[1] == root_hash:
            return cp, cached[2]
        note = self.signer.sign_note(cp.text())
        with self._cache_lock:
            self._cached = (size, root_hash, note)
        return cp, note

    def receipt(self, tx: NodeStore, leaves: Sequence[tuple[int, str]],
                since: int | None = None) -> dict[str, Any]:
        """A release receipt: the signed checkpoint, each leaf's record and inclusion proof,
        and (if the caller saw size ``since`` before) a consistency proof from it.  Every
        node the receipt needs is read in one query."""
        size = tx.tlog_size()
        leaves = [(i, r) for i, r in leaves if i < size]
        groups: list[list[tuple[int, int]]] = [[(0, size)] if size else []]
        groups += [inclusion_ranges(index, size) for index, _ in leaves]
        with_consistency = since is not None and 0 < since <= size
        if with_consistency:
            assert since is not None
            groups.append(consistency_ranges(since, size))
        flat = _range_hashes(tx, [r for g in groups for r in g])
        split: list[list[bytes]] = []
        for g in groups:
            split.append(flat[:len(g)])
            flat = flat[len(g):]
        _, note = self._signed(size, split[0][0] if size else EMPTY_ROOT)
        out: dict[str, Any] = {
            "log_key": self.verifier.vkey, "checkpoint": note,
            "entries": [{"leaf_index": index, "record": record,
                         "inclusion_proof": _b64list(proof)}
                        for (index, record), proof in zip(leaves, split[1:1 + len(leaves)],
                                                          strict=True)]}
        if with_consistency:
            out["consistency"] = {"from_size": since, "proof": _b64list(split[-1])}
        return out


def check_store_key(tx: Any, verifier: Verifier) -> None:
    """Record the log's verifier key in the store on first use, and refuse a replica whose
    signer differs (replicas share one log, so they must share its key)."""
    stored = tx.tlog_meta(META_VKEY)
    if stored is None:
        tx.tlog_set_meta(META_VKEY, verifier.vkey)
    elif stored != verifier.vkey:
        raise ConfigError(f"this keyserver's transparency-log key ({verifier.vkey}) is not the "
                          f"one the store's log is signed with ({stored}): copy "
                          f"{SIGNER_FILE} from the first replica's data directory")


def catch_up(tx: Any, records: Callable[[int, int], list[tuple[int, str]]],
             target: int, batch: int = 10_000) -> int:
    """Add the leaves of audit records the tree lacks (a store from before the log, up to
    leaf ``target``); returns how many were added."""
    size = tx.tlog_size()
    added = 0
    while size < target:
        rows = records(size, min(batch, target - size))
        if not rows:
            break
        for seq, record_json in rows:
            if seq - 1 != size:
                raise IntegrityError(f"audit record #{size + 1} is missing; cannot build the "
                                     f"transparency log past it")
            append_leaf(tx, size, crypto.merkle_leaf_hash(record_json.encode()))
            size += 1
            added += 1
    return added


# ----------------------------------------------------------------------- the witness side

class Witness:
    """What a keycache (or any relying party) keeps of the log: the verifier key (given,
    or pinned on first sight over the authenticated channel) and the newest checkpoint it
    accepted.  A checkpoint inconsistent with it makes the witness *fail closed for good*:
    every later call raises :class:`LogInconsistent` until an operator looks."""

    def __init__(self, verifier: Verifier | str | None = None) -> None:
        self.verifier = Verifier.parse(verifier) if isinstance(verifier, str) else verifier
        self.latest: Checkpoint | None = None
        self.latest_note: str | None = None
        self.broken: str | None = None
        #: Held by a client across "send ?tlog_since=size, check the receipt": two
        #: releases through one witness must not interleave, or the second's consistency
        #: proof would start from a size the first one already moved past.
        self.lock = threading.RLock()
        self._lock = self.lock

    @property
    def size(self) -> int | None:
        return self.latest.size if self.latest is not None else None

    def check_receipt(self, receipt: Any) -> tuple[Checkpoint, dict[int, dict[str, Any]]]:
        """Verify a release receipt: signature, consistency with what was seen before, and
        every entry's inclusion proof.  Returns the checkpoint and the included records by
        leaf index.  The newest checkpoint is kept only if everything verifies."""
        with self._lock:
            if self.broken is not None:
                raise LogInconsistent(self.broken)
            if not isinstance(receipt, dict):
                raise TransparencyError("the release carries no transparency-log receipt")
            verifier = self._verifier(receipt.get("log_key"))
            note = receipt.get("checkpoint")
            if not isinstance(note, str):
                raise TransparencyError("the receipt carries no checkpoint")
            cp = open_checkpoint(note, verifier)
            self._extend(cp, receipt.get("consistency"))
            included: dict[int, dict[str, Any]] = {}
            entries = receipt.get("entries")
            if not isinstance(entries, list):
                raise TransparencyError("receipt entries are missing")
            for entry in entries:
                index, record = _entry(entry)
                proof = decode_hashes(entry.get("inclusion_proof"), what="inclusion proof")
                verify_inclusion(index, cp.size, crypto.merkle_leaf_hash(record.encode()),
                                 proof, cp.root)
                included[index] = json.loads(record)
            self.latest, self.latest_note = cp, note
            return cp, included

    def _verifier(self, vkey: Any) -> Verifier:
        offered = Verifier.parse(vkey) if isinstance(vkey, str) else None
        if self.verifier is None:
            if offered is None:
                raise TransparencyError("the receipt names no log key")
            self.verifier = offered
            log.info("transparency log key pinned on first use: %s", offered.vkey)
        elif offered is not None and offered != self.verifier:
            self._break(f"the keyserver's log key changed from {self.verifier.vkey} to "
                        f"{offered.vkey}")
        return self.verifier

    def _extend(self, cp: Checkpoint, consistency: Any) -> None:
        old = self.latest
        if old is None:
            return
        try:
            if cp.size <= old.size:
                if cp.size < old.size:
                    raise LogInconsistent(f"the log shrank from {old.size} to {cp.size} "
                                          f"leaves (truncated or rolled back)")
                verify_consistency(old.size, cp.size, old.root, cp.root, [])
                return
            if not isinstance(consistency, dict) or consistency.get("from_size") != old.size:
                raise LogInconsistent(f"the receipt has no consistency proof from the size "
                                      f"{old.size} seen before")
            proof = decode_hashes(consistency.get("proof"), what="consistency proof")
            verify_consistency(old.size, cp.size, old.root, cp.root, proof)
        except LogInconsistent as exc:
            self._break(str(exc))

    def _break(self, why: str) -> None:
        self.broken = (f"transparency log inconsistent: {why}; last good checkpoint: "
                       f"{self.latest.size if self.latest else 0} leaves")
        log.error("%s", self.broken)
        raise LogInconsistent(self.broken)


def _entry(entry: Any) -> tuple[int, str]:
    if not isinstance(entry, dict):
        raise TransparencyError("receipt entry is not an object")
    index, record = entry.get("leaf_index"), entry.get("record")
    if type(index) is not int or index < 0 or not isinstance(record, str):
        raise TransparencyError("receipt entry needs an integer leaf_index and a record")
    try:
        json.loads(record)
    except ValueError:
        raise TransparencyError("receipt entry's record is not JSON") from None
    return index, record


def release_record_matches(record: dict[str, Any], *, model_id: str, version: int,
                           thumbprint: str) -> bool:
    """Is ``record`` the keyserver's ``allow`` record of releasing this key to this key
    pair?  (What a keycache checks before it uses a released key.)"""
    if record.get("event") != "release" or record.get("decision") != "allow":
        return False
    if record.get("model_id") != model_id or record.get("key_thumbprint") != thumbprint:
        return False
    versions = record.get("versions")
    return record.get("version") == version or (
        isinstance(versions, list) and version in versions)


def open_log(store: Any, data_dir: Path) -> TransparencyLog:
    """The log of a keyserver data directory: its signer (created on first run), checked
    against the key the store's log is signed with, and the tree caught up with any audit
    records written before the log existed."""
    signer = load_or_create_signer(data_dir)
    with store.transaction() as tx:
        check_store_key(tx, signer.verifier)
        head = int(tx.audit_head()[0])
        added = catch_up(tx, tx.audit_leaves, head)
    if added:
        log.info("transparency log: built %d leaves for existing audit records", added)
    return TransparencyLog(signer)


# ----------------------------------------------------------------------- offline audit

def roots_of(leaves: Iterable[bytes], sizes: Iterable[int]) -> dict[int, bytes]:
    """MTH of the first *n* leaf hashes for each *n* in ``sizes``, in one O(n) pass that
    keeps only the O(log n) complete subtrees on the right edge (what ``audit verify``
    recomputes from the records themselves, trusting no stored node)."""
    want = set(sizes)
    out: dict[int, bytes] = {}
    if 0 in want:
        out[0] = EMPTY_ROOT
    stack: list[tuple[int, bytes]] = []  # (level, hash), levels strictly decreasing
    n = 0
    for leaf in leaves:
        level, acc = 0, leaf
        while stack and stack[-1][0] == level:
            acc = crypto.merkle_node_hash(stack.pop()[1], acc)
            level += 1
        stack.append((level, acc))
        n += 1
        if n in want:
            out[n] = fold([h for _, h in stack])
    return out


@dataclass(frozen=True)
class LogReport:
    """Outcome of :func:`verify_log`."""

    ok: bool
    leaves: int
    root: bytes
    problems: tuple[str, ...] = ()
    saved_size: int | None = None


def verify_log(tx: Any, records: Sequence[Any], *, saved: str | None = None,
               verifier: Verifier | None = None) -> LogReport:
    """Recompute the tree from the audit ``records`` (all of them, in order) and check it
    against the stored tree and, if given, a checkpoint ``saved`` earlier: a record
    rewritten, deleted, inserted or reordered since, or a truncated log, makes the saved
    root unreachable and is reported."""
    problems: list[str] = []
    leaves = [crypto.merkle_leaf_hash(r.record_json.encode()) for r in records]
    saved_cp: Checkpoint | None = None
    if saved is not None:
        if verifier is None:
            raise ConfigError("verifying a saved checkpoint needs the log's verifier key")
        saved_cp = open_checkpoint(saved, verifier)
    sizes = {len(leaves)} | ({saved_cp.size} if saved_cp is not None
                             and saved_cp.size <= len(leaves) else set())
    roots = roots_of(leaves, sizes)
    current = roots[len(leaves)]
    for i, rec in enumerate(records):
        if rec.seq != i + 1:
            problems.append(f"audit record #{i + 1} is missing (found #{rec.seq} in its "
                            f"place): records were deleted or reordered")
            break
    stored_size = tx.tlog_size()
    if stored_size != len(leaves):
        problems.append(f"the stored tree has {stored_size} leaves, the audit log "
                        f"{len(leaves)} records")
    else:
        try:
            if root(tx, stored_size) != current:
                problems.append("the stored tree's root does not match the records")
        except IntegrityError as exc:
            problems.append(str(exc))
    if saved_cp is not None:
        if saved_cp.size > len(leaves):
            problems.append(f"the saved checkpoint covers {saved_cp.size} records but the log "
                            f"now holds {len(leaves)}: the log was TRUNCATED")
        elif roots[saved_cp.size] != saved_cp.root:
            problems.append(f"the first {saved_cp.size} records no longer hash to the saved "
                            f"checkpoint's root: history was REWRITTEN (records changed, "
                            f"deleted, inserted or reordered)")
    return LogReport(not problems, len(leaves), current, tuple(problems),
                     saved_cp.size if saved_cp is not None else None)


def read_signer(data_dir: Path) -> Signer:
    """A data directory's log signer (never created here: `keyserver init` or the first
    `keyserver run` does that)."""
    path = Path(data_dir) / SIGNER_FILE
    raw = secretfile.read_private(path, what="the transparency-log signing key (created by "
                                  "`keyserver init` or the first `keyserver run`)",
                                  error=ConfigError)
    return Signer.from_skey(raw.decode(errors="replace"))


def read_verifier(data_dir: Path) -> Verifier:
    """The verifier key of a data directory's log (without creating a signer)."""
    return read_signer(data_dir).verifier
