"""AMD's CRL for SEV-SNP chains: checked when it can be had (cache, then the KDS), with a clear
status when not.  There is no network here, so the CRL logic runs on CRLs built and signed in
the test by a test CA, through the same functions the verifier uses (``snp.check_crl`` and
``snp._crl_status``), and on the real Milan chain, whose ARK key we do not have: a CRL in its
name that it did not sign is never believed."""

from __future__ import annotations

import datetime
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from sealedtorch.attest import Evidence, Tee, VerifierConfig, kds, snp, verify
from sealedtorch.errors import AttestationError, CollateralError

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
AT = int(NOW.timestamp())
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, issuer: str, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey,
          serial: int, *, ca: bool = True) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW - datetime.timedelta(days=365))
            .not_valid_after(NOW + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA384(), rsa_padding=_PSS))


def _crl(issuer: x509.Name, signer: rsa.RSAPrivateKey, revoked: list[int], *,
         this_update: datetime.datetime = NOW - datetime.timedelta(days=1),
         next_update: datetime.datetime = NOW + datetime.timedelta(days=6)) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer)
               .last_update(this_update).next_update(next_update))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(NOW - datetime.timedelta(days=2)).build())
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS).public_bytes(
        serialization.Encoding.DER)


class AmdTestCa:
    """A test ARK -> ASK -> VCEK chain, RSA-PSS/SHA-384 like AMD's."""

    def __init__(self) -> None:
        self.ark_key, ask_key, vcek_key = _key(), _key(), _key()
        self.ark = _cert("ARK-Milan", "ARK-Milan", self.ark_key, self.ark_key, 1)
        self.ask = _cert("SEV-Milan", "ARK-Milan", ask_key, self.ark_key, 0x5EED)
        self.vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key, ask_key, 7, ca=False)
        self.chain = snp._Chain(product="Milan", leaf=self.vcek, intermediate=self.ask,
                                ark=self.ark)
        self.certs = [("ASK/ASVK", self.ask), ("VCEK/VLEK", self.vcek)]

    def crl(self, revoked: list[int] = (), **kw) -> bytes:  # type: ignore[assignment]
        return _crl(self.ark.subject, self.ark_key, list(revoked), **kw)


@pytest.fixture(scope="module")
def ca() -> AmdTestCa:
    return AmdTestCa()


@pytest.fixture
def kds_server() -> Iterator[tuple[str, dict[str, bytes], Counter]]:
    """A KDS on 127.0.0.1 serving whatever CRLs the test puts in its routes."""
    routes: dict[str, bytes] = {}
    hits: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] += 1
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                     daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes, hits
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- check_crl

def test_a_crl_that_lists_nothing_of_the_chain_passes(ca):
    snp.check_crl(ca.crl([1234]), ca.ark, ca.certs, AT)


def test_a_revoked_ask_is_refused_naming_it(ca):
    with pytest.raises(AttestationError, match=r"ASK/ASVK certificate 'SEV-Milan' \(serial "
                                               r"5eed\) is revoked by AMD's CRL"):
        snp.check_crl(ca.crl([0x5EED]), ca.ark, ca.certs, AT)


def test_a_crl_not_signed_by_the_ark_is_a_collateral_error(ca):
    forged = _crl(ca.ark.subject, _key(), [])
    with pytest.raises(CollateralError, match="not signed by the ARK 'ARK-Milan'"):
        snp.check_crl(forged, ca.ark, ca.certs, AT)


@pytest.mark.parametrize(("this_update", "next_update"), [
    (NOW - datetime.timedelta(days=10), NOW - datetime.timedelta(seconds=1)),
    (NOW + datetime.timedelta(seconds=1), NOW + datetime.timedelta(days=7)),
], ids=["stale", "not-yet-valid"])
def test_a_crl_outside_its_dates_is_a_collateral_error(ca, this_update, next_update):
    with pytest.raises(CollateralError, match="AMD CRL is not current"):
        snp.check_crl(ca.crl(this_update=this_update, next_update=next_update), ca.ark,
                      ca.certs, AT)


@pytest.mark.parametrize("blob", [b"", b"\x30\x03\x02\x01\x01", b"not a crl"])
def test_garbage_instead_of_a_crl_is_a_collateral_error(ca, blob):
    with pytest.raises(CollateralError, match="not a DER CRL"):
        snp.check_crl(blob, ca.ark, ca.certs, AT)


# --------------------------------------------------------------------------- where it comes from

def test_a_cached_crl_is_used_and_reported_good(ca, tmp_path):
    kds.store_crl(tmp_path, "Milan", ca.crl())
    assert snp._crl_status(ca.chain, VerifierConfig(cache_dir=tmp_path), AT) == "good"


def test_a_cached_crl_revoking_the_ask_refuses(ca, tmp_path):
    kds.store_crl(tmp_path, "Milan", ca.crl([0x5EED]))
    with pytest.raises(AttestationError, match="revoked"):
        snp._crl_status(ca.chain, VerifierConfig(cache_dir=tmp_path), AT)


def test_without_a_crl_the_status_says_so(ca, tmp_path):
    status = snp._crl_status(ca.chain, VerifierConfig(cache_dir=tmp_path), AT)
    assert status == "unavailable: fetching AMD's CRL is not enabled"


def test_a_fetched_crl_is_checked_then_cached(ca, tmp_path, kds_server):
    url, routes, hits = kds_server
    routes["/vcek/v1/Milan/crl"] = ca.crl()
    config = VerifierConfig(cache_dir=tmp_path, kds_url=url, fetch_amd_crl=True)
    assert snp._crl_status(ca.chain, config, AT) == "good"
    assert kds.crl_cache_file(tmp_path, "Milan").read_bytes() == routes["/vcek/v1/Milan/crl"]
    assert snp._crl_status(ca.chain, config, AT) == "good"
    assert hits["/vcek/v1/Milan/crl"] == 1  # the second check used the cache


def test_a_stale_cached_crl_is_refreshed_from_the_kds(ca, tmp_path, kds_server):
    url, routes, hits = kds_server
    kds.store_crl(tmp_path, "Milan", ca.crl(this_update=NOW - datetime.timedelta(days=9),
                                            next_update=NOW - datetime.timedelta(days=2)))
    routes["/vcek/v1/Milan/crl"] = ca.crl([0x5EED])  # meanwhile AMD revoked the ASK
    config = VerifierConfig(cache_dir=tmp_path, kds_url=url, fetch_amd_crl=True)
    with pytest.raises(AttestationError, match="revoked"):
        snp._crl_status(ca.chain, config, AT)
    assert hits["/vcek/v1/Milan/crl"] == 1


def test_a_forged_crl_from_the_kds_is_not_cached(ca, tmp_path, kds_server):
    url, routes, _ = kds_server
    routes["/vcek/v1/Milan/crl"] = _crl(ca.ark.subject, _key(), [])
    config = VerifierConfig(cache_dir=tmp_path, kds_url=url, fetch_amd_crl=True)
    status = snp._crl_status(ca.chain, config, AT)
    assert status.startswith("unavailable: AMD CRL is not signed by the ARK")
    assert not kds.crl_cache_file(tmp_path, "Milan").exists()


def test_an_unreachable_kds_gives_a_clear_status(ca, tmp_path):
    config = VerifierConfig(cache_dir=tmp_path, kds_url="http://127.0.0.1:9",
                            fetch_amd_crl=True, http_timeout=5)
    status = snp._crl_status(ca.chain, config, AT)
    assert status.startswith("unavailable: AMD KDS unreachable fetching the Milan CRL")


# --------------------------------------------------------------------------- the real chain

def _real(evidence: Path, config: VerifierConfig):
    ev = Evidence(Tee.SNP, (evidence / "snp/milan-report.bin").read_bytes(),
                  certificates=(evidence / "snp/milan-vcek.der").read_bytes()
                  + (evidence / "snp/milan-ask-ark.pem").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VCEK serial 0 (tested in test_snp.py)
        return verify(ev, at=AT, config=config)


def _real_ark_and_ask(evidence: Path) -> tuple[x509.Certificate, x509.Certificate]:
    certs = x509.load_pem_x509_certificates((evidence / "snp/milan-ask-ark.pem").read_bytes())
    ark = next(c for c in certs if c.subject == c.issuer)
    ask = next(c for c in certs if c.subject != c.issuer)
    return ark, ask


def test_real_milan_report_without_a_crl_verifies_with_the_status_unavailable(evidence,
                                                                              tmp_path):
    claims = _real(evidence, VerifierConfig(cache_dir=tmp_path))
    assert claims.crl_status == "unavailable: fetching AMD's CRL is not enabled"


def test_a_crl_in_the_real_arks_name_that_it_did_not_sign_is_not_believed(evidence,
                                                                           tmp_path,
                                                                           kds_server):
    ark, ask = _real_ark_and_ask(evidence)
    forged = _crl(ark.subject, _key(), [ask.serial_number])  # "revokes" the real ASK
    with pytest.raises(CollateralError, match="not signed by the ARK 'ARK-Milan'"):
        snp.check_crl(forged, ark, [("ASK/ASVK", ask)], AT)
    url, routes, hits = kds_server
    routes["/vcek/v1/Milan/crl"] = forged
    claims = _real(evidence, VerifierConfig(cache_dir=tmp_path, kds_url=url,
                                            fetch_amd_crl=True))
    assert hits["/vcek/v1/Milan/crl"] == 1
    assert claims.crl_status.startswith("unavailable: AMD CRL is not signed by the ARK")
    kds.store_crl(tmp_path, "Milan", forged)  # a poisoned cache is no better
    claims = _real(evidence, VerifierConfig(cache_dir=tmp_path))
    assert claims.crl_status.startswith("unavailable: cached CRL unusable: AMD CRL is not "
                                        "signed by the ARK")
