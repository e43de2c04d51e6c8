"""attest.appraise: the one front door that verifies evidence and checks its binding."""

from __future__ import annotations

import os

import pytest

from sealedtorch.attest import (
    Evidence,
    SimClaims,
    Tee,
    Verifier,
    VerifierConfig,
    appraise,
    binding,
    sim,
    verifier_for,
)
from sealedtorch.errors import AttestationError, BindingError

MEASUREMENT = b"\x07" * 48


@pytest.fixture
def platform(tmp_path):
    return sim.init_platform(tmp_path / "platform")


def _evidence(platform: sim.SimPlatform, nonce: bytes, key: bytes, **kw: bytes) -> Evidence:
    return platform.sign_evidence(binding.report_data(nonce, key, **kw), measurement=MEASUREMENT)


def _trusting(platform: sim.SimPlatform) -> VerifierConfig:
    return VerifierConfig(sim_platform_keys=(platform.public_key,))


def test_appraise_returns_the_claims_of_evidence_bound_to_the_nonce_and_key(platform):
    nonce, key = os.urandom(32), os.urandom(32)
    claims = appraise(_evidence(platform, nonce, key), nonce=nonce, public_key=key,
                      config=_trusting(platform))
    assert isinstance(claims, SimClaims) and claims.measurement == MEASUREMENT


def test_appraise_refuses_evidence_for_another_nonce_and_the_error_carries_its_claims(platform):
    nonce, key = os.urandom(32), os.urandom(32)
    with pytest.raises(BindingError, match="not bound to this challenge") as caught:
        appraise(_evidence(platform, nonce, key), nonce=os.urandom(32), public_key=key,
                 config=_trusting(platform))
    assert isinstance(caught.value.claims, SimClaims)
    assert caught.value.claims.measurement == MEASUREMENT


def test_appraise_refuses_evidence_made_under_another_domain_label(platform):
    nonce, key = os.urandom(32), os.urandom(32)
    evidence = _evidence(platform, nonce, key, domain=b"sealedtorch/runtime-tls/v1/test")
    with pytest.raises(BindingError):
        appraise(evidence, nonce=nonce, public_key=key, config=_trusting(platform))
    claims = appraise(evidence, nonce=nonce, public_key=key, config=_trusting(platform),
                      domain=b"sealedtorch/runtime-tls/v1/test")
    assert claims.tee is Tee.SIM


def test_appraise_verifies_before_it_checks_the_binding(platform, tmp_path):
    nonce, key = os.urandom(32), os.urandom(32)
    stranger = sim.init_platform(tmp_path / "stranger")
    with pytest.raises(AttestationError) as caught:
        appraise(_evidence(stranger, nonce, key), nonce=nonce, public_key=key,
                 config=_trusting(platform))
    assert not isinstance(caught.value, BindingError)


@pytest.mark.parametrize("tee", list(Tee))
def test_every_tee_has_a_verifier_module(tee):
    verifier: Verifier = verifier_for(tee)
    assert callable(verifier.verify)


def test_an_unknown_tee_has_no_verifier():
    with pytest.raises(AttestationError, match="unknown TEE type 'tpm'"):
        verifier_for("tpm")
