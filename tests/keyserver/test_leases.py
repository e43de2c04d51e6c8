"""Key leases on every release: issued by the real keyserver (TLS, sim evidence), verified
with the keyserver's token key, bound to model, version, policy and holder."""

from __future__ import annotations

import base64
import json

import pytest

from sealedtorch import crypto
from sealedtorch.attest.policy import DEFAULT_LEASE_SECONDS, load_policy
from sealedtorch.errors import AuthenticationError, LeaseInvalid, PolicyError
from sealedtorch.keyserver import protocol
from sealedtorch.keyserver.leases import check_lease, issue_lease, verify_lease
from sealedtorch.keyserver.protocol import b64url, b64url_decode
from sealedtorch.keyserver.tokens import TokenSigner


def _raw_release(ks, model_id: str, role: str = "holder") -> tuple[dict, bytes]:
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http)
        r = http.post("/v1/attest", json=ks.attest_body(nonce, kp.public_bytes, role=role))
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = http.get(f"/v1/keys/{model_id}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()["keys"][0], kp.public_bytes


def _server_key(ks) -> bytes:
    return TokenSigner.load(ks.init.config.path(ks.init.config.token_signing_key)).public_key


def test_every_release_carries_a_lease_signed_by_the_token_key(ks, model_id):
    ks.register(model_id, ks.policy(lease_seconds=42))
    item, holder = _raw_release(ks, model_id)
    lease = verify_lease(item["lease"], pinned_key=_server_key(ks))
    assert (lease.model_id, lease.version, lease.policy_digest) == \
        (model_id, 1, item["policy_digest"])
    assert lease.seconds == 42 and lease.not_after - lease.issued_at == 42
    assert lease.holder_thumbprint == protocol.thumbprint(holder)
    assert lease.subject == f"sim:{protocol.thumbprint(holder)}"
    check_lease(lease, model_id=model_id, version=1, policy_digest=item["policy_digest"],
                holder_public_key=holder)


def test_a_policy_without_lease_seconds_gets_the_default_lease(ks, model_id):
    ks.register(model_id)
    item, _ = _raw_release(ks, model_id, role="runtime")
    assert verify_lease(item["lease"]).seconds == DEFAULT_LEASE_SECONDS


def test_the_attested_client_returns_leases_and_the_holder_key(ks, model_id):
    key = ks.register(model_id)
    with ks.client(role="runtime") as client:
        items, holder = client.fetch_all_leased()
    mine = [(r, text) for r, text in items if r.model_key.model_id == model_id]
    assert len(mine) == 1 and mine[0][0].model_key == key
    lease = verify_lease(mine[0][1])
    assert lease.holder_thumbprint == protocol.thumbprint(holder)


def test_a_lease_for_another_holder_or_key_is_refused(ks, model_id):
    ks.register(model_id)
    item, holder = _raw_release(ks, model_id)
    lease = verify_lease(item["lease"])
    with pytest.raises(LeaseInvalid, match="another holder"):
        check_lease(lease, model_id=model_id, version=1, policy_digest=item["policy_digest"],
                    holder_public_key=crypto.EphemeralKeyPair.generate().public_bytes)
    with pytest.raises(LeaseInvalid, match="not for"):
        check_lease(lease, model_id=model_id, version=2, policy_digest=item["policy_digest"],
                    holder_public_key=holder)
    with pytest.raises(LeaseInvalid, match="not for"):
        check_lease(lease, model_id=model_id + "x", version=1,
                    policy_digest=item["policy_digest"], holder_public_key=holder)


def _forge(text: str, **changes: object) -> str:
    header, payload, signature = text.split(".")
    body = json.loads(b64url_decode(payload))
    body.update(changes)
    return header + "." + b64url(protocol.canonical_json(body)) + "." + signature


def test_a_lengthened_lease_does_not_verify(ks, model_id):
    ks.register(model_id, ks.policy(lease_seconds=5))
    item, _ = _raw_release(ks, model_id)
    with pytest.raises(LeaseInvalid, match="signature does not verify"):
        verify_lease(_forge(item["lease"], exp=2**40, lease_seconds=2**40 - 1))


def test_a_lease_signed_by_another_key_is_refused_when_a_key_is_pinned(ks, model_id):
    ks.register(model_id)
    item, _holder = _raw_release(ks, model_id)
    impostor = TokenSigner(crypto.SigningKey.generate())
    lease = verify_lease(item["lease"])
    forged = issue_lease(impostor, model_id=model_id, version=1,
                         policy_digest=item["policy_digest"], subject=lease.subject,
                         role="holder", holder_thumbprint=lease.holder_thumbprint,
                         token_id="x", now=lease.issued_at, seconds=86_400)
    assert verify_lease(forged).seconds == 86_400  # intact, but by whom?
    with pytest.raises(LeaseInvalid, match="not by the keyserver key"):
        verify_lease(forged, pinned_key=_server_key(ks))


def test_an_attestation_token_is_not_a_lease_and_a_lease_is_not_a_token(ks, model_id):
    ks.register(model_id)
    item, _ = _raw_release(ks, model_id)
    signer = TokenSigner.load(ks.init.config.path(ks.init.config.token_signing_key))
    with pytest.raises(AuthenticationError):
        signer.verify(item["lease"], now=ks.clock())
    with ks.client() as client:
        client.attest()
        token = client.result.token
    with pytest.raises(LeaseInvalid):
        verify_lease(token)


@pytest.mark.parametrize("text", ["", "a.b", "a.b.c", "x" * 10_000, None, 5,
                                  "e30.e30." + base64.urlsafe_b64encode(b"s").decode()])
def test_malformed_leases_are_refused_with_a_typed_error(text):
    with pytest.raises(LeaseInvalid):
        verify_lease(text)


@pytest.mark.parametrize("value", [0, -5, 86_401, "60", 1.5, True])
def test_lease_seconds_outside_one_second_to_one_day_is_a_policy_error(value):
    with pytest.raises(PolicyError, match="lease_seconds"):
        load_policy({"allow": [{"tee": "sim", "measurement": "00" * 48}],
                     "lease_seconds": value})


def test_an_unset_lease_keeps_the_policy_digest_of_before_leases():
    plain = {"allow": [{"tee": "sim", "measurement": "00" * 48}]}
    policy = load_policy(plain)
    assert "lease_seconds" not in policy.to_json()
    assert policy.lease_duration == DEFAULT_LEASE_SECONDS
    leased = load_policy({**plain, "lease_seconds": 30})
    assert leased.lease_duration == 30 and leased.digest() != policy.digest()
