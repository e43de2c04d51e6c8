"""The keycache's proof on each answer, checked by the runtime (issue 10 §2), one way of
breaking it per test.  Each keycache is a server thread on a real Unix socket whose answer
signer is replaced by a dishonest one; the runtime's client refuses every such answer with
KeycacheAttestationError and never opens the key."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sealedtorch import crypto
from sealedtorch.attest import binding
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import KeycacheAttestationError
from sealedtorch.keycache import protocol
from sealedtorch.keycache.local import AnswerSigner, LocalRequest
from sealedtorch.keys import ModelKey

from .conftest import KEYCACHE_MEASUREMENT, OTHER_MEASUREMENT, sim_policy

POLICY = sim_policy()


class ReplayingSigner(AnswerSigner):
    """Keeps the proof of its first answer and sends it again with every later one."""

    def __init__(self, attester: Any) -> None:
        super().__init__(attester)
        self.first: dict[str, Any] | None = None

    def answer(self, request: LocalRequest, released: dict[str, Any]) -> dict[str, Any]:
        if self.first is None:
            self.first = super().answer(request, released)
        return self.first


class KeyReleaseDomainSigner(AnswerSigner):
    """Evidence with the key-release binding (attest/v1 domain) instead of the answer one."""

    def answer(self, request: LocalRequest, released: dict[str, Any]) -> dict[str, Any]:
        out = super().answer(request, released)
        assert request.runtime_nonce is not None
        ev = self.attester.evidence(binding.report_data(request.runtime_nonce, self.public_key))
        out["keycache_evidence"] = ev.to_json()
        return out


class OtherKeySigner(AnswerSigner):
    """Attested answer key A, but the signature is made with another key B."""

    def answer(self, request: LocalRequest, released: dict[str, Any]) -> dict[str, Any]:
        out = super().answer(request, released)
        other = crypto.SigningKey.generate()
        parts = protocol.answer_transcript_parts(
            public_key=request.public_key, nonce=request.nonce,
            runtime_nonce=request.runtime_nonce or b"", model_id=released["model_id"],
            version=released["version"], sealed_key=released["sealed_key"],
            policy_digest=released["policy_digest"])
        out["signature"] = base64.b64encode(crypto.sign_transcript(
            other, protocol.ANSWER_SIGNATURE_LABEL, *parts)).decode()
        return out


class WrongPolicyDigestSigner(AnswerSigner):
    """Signs a policy digest other than the one the answer carries."""

    def answer(self, request: LocalRequest, released: dict[str, Any]) -> dict[str, Any]:
        return super().answer(request, {**released, "policy_digest": "f" * 64})


def test_an_honest_answer_carries_evidence_bound_to_the_runtime_nonce(start_keycache,
                                                                      runtime):
    key = ModelKey.generate("m")
    kc = start_keycache([(key, POLICY)])
    assert kc.client(runtime).get_key("m") == key


def test_replayed_answer_evidence_is_refused(start_keycache, runtime, platform):
    key = ModelKey.generate("m")
    kc = start_keycache([(key, POLICY)],
                        signer=ReplayingSigner(SimAttester(platform, KEYCACHE_MEASUREMENT)))
    client = kc.client(runtime)
    assert client.get_key("m") == key  # the first answer is genuine
    with pytest.raises(KeycacheAttestationError, match="not bound to this request"):
        client.get_key("m")


def test_evidence_with_the_key_release_binding_is_refused(start_keycache, runtime, platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)],
                        signer=KeyReleaseDomainSigner(SimAttester(platform,
                                                                  KEYCACHE_MEASUREMENT)))
    with pytest.raises(KeycacheAttestationError, match="not bound to this request"):
        kc.client(runtime).get_key("m")


def test_a_signature_by_another_key_than_the_attested_one_is_refused(start_keycache, runtime,
                                                                     platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)],
                        signer=OtherKeySigner(SimAttester(platform, KEYCACHE_MEASUREMENT)))
    with pytest.raises(KeycacheAttestationError, match="signature"):
        kc.client(runtime).get_key("m")


def test_a_signature_over_other_answer_fields_is_refused(start_keycache, runtime, platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)],
                        signer=WrongPolicyDigestSigner(SimAttester(platform,
                                                                   KEYCACHE_MEASUREMENT)))
    with pytest.raises(KeycacheAttestationError, match="signature"):
        kc.client(runtime).get_key("m")


def test_a_keycache_matching_no_rule_is_refused_with_every_reason(start_keycache, runtime,
                                                                  platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)],
                        signer=AnswerSigner(SimAttester(platform, OTHER_MEASUREMENT)))
    with pytest.raises(KeycacheAttestationError) as refused:
        kc.client(runtime).get_key("m")
    assert any(r.startswith("keycache[0] (sim): measurement: expected")
               for r in refused.value.reasons)


def test_a_keycache_serving_without_a_signer_is_refused(start_keycache, runtime):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)], signer=None)
    with pytest.raises(KeycacheAttestationError, match="without evidence of its own"):
        kc.client(runtime).get_key("m")


def test_a_debug_keycache_is_refused_unless_the_rule_allows_debug(start_keycache, runtime,
                                                                  platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)], signer=AnswerSigner(
        SimAttester(platform, KEYCACHE_MEASUREMENT, debug=True)))
    with pytest.raises(KeycacheAttestationError, match="debug: expected false"):
        kc.client(runtime).get_key("m")
