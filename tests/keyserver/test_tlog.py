"""The transparency log's tree, proofs and signed notes, against a naive RFC 9162 tree and
the published signed-note vector."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealedtorch import crypto
from sealedtorch.errors import LogInconsistent, TransparencyError
from sealedtorch.keyserver import tlog

# --- a naive reference: RFC 9162 §2.1 written as recursion over the leaf list -----------

def mth(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return crypto.sha256()
    if len(leaves) == 1:
        return crypto.merkle_leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return crypto.merkle_node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


class MemoryNodes:
    """The NodeStore protocol over a dict (the SQL stores are tested in test_tlog_store)."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.reads = 0

    def tlog_size(self) -> int:
        return sum(1 for level, _ in self.nodes if level == 0)

    def tlog_nodes(self, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        coords = list(coords)
        self.reads += len(coords)
        return {c: self.nodes[c] for c in coords if c in self.nodes}

    def tlog_put_nodes(self, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        for level, idx, h in nodes:
            assert (level, idx) not in self.nodes
            self.nodes[(level, idx)] = h


def build(leaves: Sequence[bytes]) -> MemoryNodes:
    store = MemoryNodes()
    for i, leaf in enumerate(leaves):
        tlog.append_leaf(store, i, crypto.merkle_leaf_hash(leaf))
    return store


LEAVES = st.lists(st.binary(max_size=8), min_size=1, max_size=70)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LEAVES, st.data())
def test_stored_tree_gives_the_reference_root_and_inclusion_proofs(
        leaves: list[bytes], data: st.DataObject) -> None:
    store = build(leaves)
    size = data.draw(st.integers(1, len(leaves)))
    index = data.draw(st.integers(0, size - 1))
    assert tlog.root(store, size) == mth(leaves[:size])
    proof = tlog.inclusion_proof(store, index, size)
    assert proof == path(index, leaves[:size])
    tlog.verify_inclusion(index, size, crypto.merkle_leaf_hash(leaves[index]), proof,
                          mth(leaves[:size]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LEAVES, st.data())
def test_stored_tree_gives_the_reference_consistency_proofs(
        leaves: list[bytes], data: st.DataObject) -> None:
    store = build(leaves)
    second = data.draw(st.integers(1, len(leaves)))
    first = data.draw(st.integers(1, second))
    proof = tlog.consistency_proof(store, first, second)
    assert proof == (subproof(first, leaves[:second], True) if first < second else [])
    tlog.verify_consistency(first, second, mth(leaves[:first]), mth(leaves[:second]), proof)


@settings(max_examples=100, deadline=None)
@given(LEAVES, st.data())
def test_a_rewritten_leaf_fails_the_consistency_proof(leaves: list[bytes],
                                                      data: st.DataObject) -> None:
    second = data.draw(st.integers(2, max(2, len(leaves) + 1)))
    leaves = (leaves + [b"pad"] * second)[:second]
    first = data.draw(st.integers(1, second - 1))
    victim = data.draw(st.integers(0, first - 1))
    forged = list(leaves)
    forged[victim] = leaves[victim] + b"!"
    store = build(forged)
    proof = tlog.consistency_proof(store, first, second)
    with pytest.raises(LogInconsistent):
        tlog.verify_consistency(first, second, mth(leaves[:first]), mth(forged), proof)


@settings(max_examples=100, deadline=None)
@given(LEAVES, st.data())
def test_a_tampered_inclusion_proof_is_refused(leaves: list[bytes],
                                               data: st.DataObject) -> None:
    if len(leaves) < 2:
        leaves = [*leaves, b"x"]
    store = build(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = tlog.inclusion_proof(store, index, len(leaves))
    which = data.draw(st.integers(0, len(proof) - 1))
    proof[which] = bytes(b ^ 1 for b in proof[which])
    with pytest.raises(TransparencyError):
        tlog.verify_inclusion(index, len(leaves), crypto.merkle_leaf_hash(leaves[index]),
                              proof, mth(leaves))


def test_appends_and_proofs_read_a_logarithmic_number_of_nodes() -> None:
    store = build([str(i).encode() for i in range(4096 + 123)])
    store.reads = 0
    tlog.append_leaf(store, 4096 + 123, crypto.merkle_leaf_hash(b"next"))
    assert store.reads <= 13
    store.reads = 0
    tlog.inclusion_proof(store, 77, 4096 + 124)
    tlog.consistency_proof(store, 1000, 4096 + 124)
    assert store.reads <= 2 * 13 * 4


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert tlog.root(MemoryNodes(), 0).hex() == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_truncation_is_a_log_inconsistency() -> None:
    with pytest.raises(LogInconsistent, match="shrank"):
        tlog.verify_consistency(5, 4, b"\0" * 32, b"\0" * 32, [])


def test_same_size_different_root_is_a_fork() -> None:
    with pytest.raises(LogInconsistent, match="fork"):
        tlog.verify_consistency(5, 5, b"\0" * 32, b"\1" * 32, [])


# --- signed notes: the published golang.org/x/mod/sumdb/note vector ---------------------

GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_NOTE = GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUg" \
    "YN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"


def test_signing_the_published_vector_reproduces_it_byte_for_byte() -> None:
    signer = tlog.Signer.from_skey(GO_SKEY)
    assert signer.verifier.vkey == GO_VKEY
    assert signer.sign_note(GO_TEXT) == GO_NOTE
    assert signer.skey() == GO_SKEY


def test_the_published_vector_opens_with_its_verifier_key() -> None:
    assert tlog.open_note(GO_NOTE, tlog.Verifier.parse(GO_VKEY)) == GO_TEXT


def test_an_altered_note_is_refused() -> None:
    with pytest.raises(TransparencyError, match="does not verify"):
        tlog.open_note(GO_NOTE.replace("cryptography", "cryptographY"),
                       tlog.Verifier.parse(GO_VKEY))


def test_a_note_from_another_key_is_refused() -> None:
    other = tlog.Signer.generate("PeterNeumann")
    with pytest.raises(TransparencyError, match="no signature"):
        tlog.open_note(GO_NOTE, other.verifier)


def test_a_verifier_key_with_a_wrong_id_is_refused() -> None:
    with pytest.raises(TransparencyError, match="key ID"):
        tlog.Verifier.parse(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_checkpoint_note_is_the_c2sp_layout() -> None:
    signer = tlog.Signer.generate("example.com/log")
    cp = tlog.Checkpoint("example.com/log", 12, b"\x07" * 32)
    note = signer.sign_note(cp.text())
    lines = note.split("\n")
    assert lines[:4] == ["example.com/log", "12", base64.b64encode(b"\x07" * 32).decode(), ""]
    assert lines[4].startswith("\u2014 example.com/log ")
    blob = base64.b64decode(lines[4].split(" ")[2])
    assert blob[:4] == crypto.sha256(b"example.com/log\n\x01" + signer.key.public_bytes)[:4]
    assert len(blob) == 68
    assert tlog.open_checkpoint(note, signer.verifier) == cp


def test_a_checkpoint_with_a_leading_zero_size_is_refused() -> None:
    signer = tlog.Signer.generate("example.com/log")
    note = signer.sign_note("example.com/log\n012\n" + base64.b64encode(b"\0" * 32).decode()
                            + "\n")
    with pytest.raises(TransparencyError, match="decimal"):
        tlog.open_checkpoint(note, signer.verifier)


@settings(max_examples=60, deadline=None)
@given(LEAVES, st.data())
def test_a_receipt_verifies_with_a_witness_that_saw_an_earlier_size(
        leaves: list[bytes], data: st.DataObject) -> None:
    records = [f'{{"n":{i}}}' for i in range(len(leaves))]
    store = MemoryNodes()
    for i, r in enumerate(records):
        tlog.append_leaf(store, i, crypto.merkle_leaf_hash(r.encode()))
    log = tlog.TransparencyLog(tlog.Signer.generate("example.com/log"))
    earlier = data.draw(st.integers(1, len(records)))
    witness = tlog.Witness(log.verifier)
    witness.latest = tlog.Checkpoint("example.com/log", earlier,
                                     mth([r.encode() for r in records[:earlier]]))
    picked = sorted(set(data.draw(st.lists(st.integers(0, len(records) - 1), max_size=3))))
    receipt = log.receipt(store, [(i, records[i]) for i in picked], since=earlier)
    cp, included = witness.check_receipt(receipt)
    assert cp.size == len(records)
    assert sorted(included) == picked
    assert witness.size == len(records)


# --- the RFC 6962 / certificate-transparency test vectors ---------------------------------

CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
             "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_stored_tree_reproduces_the_rfc6962_test_vector_roots() -> None:
    store = build([bytes.fromhex(x) for x in CT_LEAVES])
    assert [tlog.root(store, n).hex() for n in range(1, 9)] == CT_ROOTS


def test_inclusion_proof_of_the_rfc6962_test_vector() -> None:
    store = build([bytes.fromhex(x) for x in CT_LEAVES])
    assert [h.hex() for h in tlog.inclusion_proof(store, 5, 8)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]


def test_consistency_proofs_of_the_rfc6962_test_vector() -> None:
    store = build([bytes.fromhex(x) for x in CT_LEAVES])
    assert [h.hex() for h in tlog.consistency_proof(store, 6, 8)] == [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]
    assert [h.hex() for h in tlog.consistency_proof(store, 2, 5)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]
