"""The sim TEE: platform files, the signed statement, and its verifier (via the front door)."""

from __future__ import annotations

import logging
import os
import stat
import struct
import time

import pytest

from sealedtorch import crypto
from sealedtorch.attest import Evidence, SimClaims, Tee, VerifierConfig, binding, sim
from sealedtorch.attest import verify as front_door_verify
from sealedtorch.errors import AttestationError, ConfigError, KeyFileError

MEASUREMENT = bytes(range(48))
NONCE = b"\x07" * 32
EPHEMERAL_KEY = b"\x42" * 32


@pytest.fixture
def platform(tmp_path):
    return sim.init_platform(tmp_path / "platform")


@pytest.fixture
def report_data():
    return binding.report_data(NONCE, EPHEMERAL_KEY)


def _config(*keys: bytes) -> VerifierConfig:
    return VerifierConfig(sim_platform_keys=tuple(keys))


def _resign(platform: sim.SimPlatform, body: bytes) -> Evidence:
    """A statement with an arbitrary body, correctly signed by ``platform``."""
    sig = platform.signing_key.sign(sim.SIGNING_DOMAIN + body)
    return Evidence(tee=Tee.SIM, data=body + sig)


# --- platform files ----------------------------------------------------------------------

def test_init_platform_writes_key_pair_with_tight_modes(tmp_path):
    d = tmp_path / "new" / "platform"
    p = sim.init_platform(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "platform.key").st_mode) == 0o600
    assert (d / "platform.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert crypto.load_ed25519_public((d / "platform.pub").read_bytes()) == p.public_key
    assert len(p.public_key) == 32
    loaded = sim.SimPlatform.load(d)
    assert loaded.public_key == p.public_key
    assert "PRIVATE" not in repr(loaded)


def test_init_platform_refuses_to_overwrite(platform):
    before = (platform.directory / "platform.key").read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        sim.init_platform(platform.directory)
    assert (platform.directory / "platform.key").read_bytes() == before


def test_load_missing_key(tmp_path):
    with pytest.raises(KeyFileError, match="no sim platform key"):
        sim.SimPlatform.load(tmp_path)


def test_load_garbage_key(tmp_path):
    (tmp_path / "platform.key").write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted Ed25519 private key"):
        sim.SimPlatform.load(tmp_path)


def test_load_mismatched_public_key(platform, tmp_path):
    other = sim.init_platform(tmp_path / "other")
    (platform.directory / "platform.pub").write_bytes((other.directory / "platform.pub")
                                                      .read_bytes())
    with pytest.raises(KeyFileError, match="does not belong"):
        sim.SimPlatform.load(platform.directory)


def test_platform_dir_discovery(tmp_path, monkeypatch):
    monkeypatch.delenv(sim.ENV_PLATFORM, raising=False)
    with pytest.raises(ConfigError, match=sim.ENV_PLATFORM):
        sim.platform_dir()
    assert sim.platform_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(sim.ENV_PLATFORM, str(tmp_path / "env"))
    assert sim.platform_dir() == tmp_path / "env"
    assert sim.platform_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_discover_from_environment(platform, monkeypatch):
    monkeypatch.setenv(sim.ENV_PLATFORM, str(platform.directory))
    assert sim.SimPlatform.discover().public_key == platform.public_key


# --- round trip --------------------------------------------------------------------------

@pytest.mark.parametrize("debug", [False, True])
def test_round_trip_through_front_door(platform, report_data, debug):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT, debug=debug, svn=7)
    assert ev.tee is Tee.SIM and len(ev.data) == sim.EVIDENCE_SIZE
    claims = front_door_verify(ev, at=0, config=_config(b"\x01" * 32, platform.public_key))
    assert isinstance(claims, SimClaims)
    assert claims.tee is Tee.SIM
    assert claims.report_data == report_data
    assert claims.measurement == MEASUREMENT
    assert claims.debug is debug
    assert claims.svn == 7
    assert claims.platform_key == platform.public_key
    assert claims.insecure is True
    assert claims.tcb_status is None
    binding.check(claims.report_data, NONCE, EPHEMERAL_KEY)
    assert claims.to_json()["insecure"] is True


def test_accepted_evidence_logs_insecure_warning(platform, report_data, caplog):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    with caplog.at_level(logging.WARNING, logger="sealedtorch.attest.sim"):
        front_door_verify(ev, config=_config(platform.public_key))
        front_door_verify(ev, config=_config(platform.public_key))
    records = [r for r in caplog.records if r.name == "sealedtorch.attest.sim"]
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert "INSECURE" in records[0].getMessage()
    assert platform.public_key.hex() in records[0].getMessage()


def test_refused_evidence_logs_no_acceptance(platform, report_data, caplog):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    with caplog.at_level(logging.WARNING, logger="sealedtorch.attest.sim"), \
            pytest.raises(AttestationError):
        front_door_verify(ev, config=_config())
    assert not [r for r in caplog.records if "accepted" in r.getMessage()]


# --- trust -------------------------------------------------------------------------------

def test_untrusted_when_no_keys_configured(platform, report_data):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    msg = "refused unless the relying party trusts that sim platform key"
    with pytest.raises(AttestationError, match=msg):
        front_door_verify(ev)
    with pytest.raises(AttestationError, match="trusts no sim platform key"):
        front_door_verify(ev, config=_config())


def test_wrong_platform_key(platform, report_data, tmp_path):
    other = sim.init_platform(tmp_path / "other")
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    with pytest.raises(AttestationError, match="refused unless the relying party trusts") as exc:
        front_door_verify(ev, config=_config(other.public_key))
    assert platform.public_key.hex() in str(exc.value)


def test_statement_claiming_trusted_key_but_signed_by_another(platform, report_data, tmp_path):
    attacker = sim.init_platform(tmp_path / "attacker")
    genuine = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    forged = _resign(attacker, genuine.data[:sim.BODY_SIZE])  # still names the trusted key
    with pytest.raises(AttestationError, match="signature does not verify"):
        front_door_verify(forged, config=_config(platform.public_key))


# --- tampering ---------------------------------------------------------------------------

FIELDS = {  # name: (offset, length), as in docs/tee-sim.md
    "magic": (0, 8), "version": (8, 2), "flags": (10, 2), "svn": (12, 4),
    "measurement": (16, 48), "report_data": (64, 64), "platform_key": (128, 32),
    "signature": (160, 64),
}


@pytest.mark.parametrize("name", list(FIELDS))
@pytest.mark.parametrize("where", ["first", "last"])
def test_flipping_a_byte_in_any_field_is_refused(platform, report_data, name, where):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT, svn=3)
    off, length = FIELDS[name]
    i = off if where == "first" else off + length - 1
    data = bytearray(ev.data)
    data[i] ^= 0x01
    flipped_key = bytes(data[128:160])
    # Trust the flipped key too, so a flip there must fail on the signature, not on trust.
    config = _config(platform.public_key, flipped_key)
    with pytest.raises(AttestationError):
        front_door_verify(Evidence(tee=Tee.SIM, data=bytes(data)), config=config)


def test_every_single_bit_flip_is_refused(platform, report_data):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    config = _config(platform.public_key)
    for i in range(len(ev.data)):
        for bit in range(8):
            data = bytearray(ev.data)
            data[i] ^= 1 << bit
            with pytest.raises(AttestationError):
                sim.verify(Evidence(tee=Tee.SIM, data=bytes(data)), at=0, config=config)


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 223, b"\x00" * 225, b"\xff" * 224, os.urandom(224), os.urandom(4096),
])
def test_wrong_size_or_garbage(platform, data):
    with pytest.raises(AttestationError):
        front_door_verify(Evidence(tee=Tee.SIM, data=data), config=_config(platform.public_key))


def test_truncated_and_extended(platform, report_data):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    config = _config(platform.public_key)
    for data in (ev.data[:-1], ev.data + b"\x00", ev.data[:sim.BODY_SIZE]):
        with pytest.raises(AttestationError, match="exactly 224 bytes"):
            front_door_verify(Evidence(tee=Tee.SIM, data=data), config=config)


def test_unknown_version_even_if_signed(platform, report_data):
    body = bytearray(platform.sign_evidence(report_data, measurement=MEASUREMENT)
                     .data[:sim.BODY_SIZE])
    struct.pack_into(">H", body, 8, 2)
    with pytest.raises(AttestationError, match="unsupported format version 2"):
        front_door_verify(_resign(platform, bytes(body)), config=_config(platform.public_key))


def test_reserved_flags_even_if_signed(platform, report_data):
    body = bytearray(platform.sign_evidence(report_data, measurement=MEASUREMENT)
                     .data[:sim.BODY_SIZE])
    struct.pack_into(">H", body, 10, 0x0003)
    with pytest.raises(AttestationError, match="reserved flag"):
        front_door_verify(_resign(platform, bytes(body)), config=_config(platform.public_key))


def test_signature_is_domain_separated(platform, report_data):
    """A signature over the bare body (no domain prefix) must not verify."""
    body = platform.sign_evidence(report_data, measurement=MEASUREMENT).data[:sim.BODY_SIZE]
    ev = Evidence(tee=Tee.SIM, data=body + platform.signing_key.sign(body))
    with pytest.raises(AttestationError, match="signature"):
        front_door_verify(ev, config=_config(platform.public_key))


def test_direct_call_with_other_tee_label(platform, report_data):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    with pytest.raises(AttestationError):
        sim.verify(Evidence(tee=Tee.SGX, data=ev.data), at=0,
                   config=_config(platform.public_key))


# --- the documented layout ---------------------------------------------------------------

def test_layout_matches_the_spec(platform, report_data):
    """Build a statement byte by byte from docs/tee-sim.md; the verifier must accept it."""
    body = (b"STSIMEV\x00" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")
            + (0x01020304).to_bytes(4, "big") + MEASUREMENT + report_data
            + platform.public_key)
    assert len(body) == 160
    sig = platform.signing_key.sign(b"sealedtorch/sim-evidence/v1\x00" + body)
    claims = front_door_verify(Evidence(tee=Tee.SIM, data=body + sig),
                               config=_config(platform.public_key))
    assert claims.debug is True and claims.svn == 0x01020304
    ours = platform.sign_evidence(report_data, measurement=MEASUREMENT, debug=True,
                                  svn=0x01020304)
    assert ours.data[:160] == body


def test_sign_evidence_rejects_bad_inputs(platform, report_data):
    with pytest.raises(ValueError):
        platform.sign_evidence(report_data[:63], measurement=MEASUREMENT)
    with pytest.raises(ValueError):
        platform.sign_evidence(report_data, measurement=MEASUREMENT[:32])
    with pytest.raises(ValueError):
        platform.sign_evidence(report_data, measurement=MEASUREMENT, svn=2**32)


def test_verify_is_fast(platform, report_data):
    ev = platform.sign_evidence(report_data, measurement=MEASUREMENT)
    config = _config(platform.public_key)
    logging.getLogger("sealedtorch.attest.sim").disabled = True
    try:
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            sim.verify(ev, at=0, config=config)
        per_call = (time.perf_counter() - t0) / n
    finally:
        logging.getLogger("sealedtorch.attest.sim").disabled = False
    assert per_call < 1e-3, f"sim verify took {per_call * 1e6:.0f} µs"
