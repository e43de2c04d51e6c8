"""DCAP collateral: parsing, validity windows, the PCCS client and the on-disk cache.

A real HTTP server on 127.0.0.1 serves the published sample collateral in PCCS v4 form
(issuer chains URL-encoded in headers, signed JSON bodies, DER/hex CRLs) and counts the
requests, so fetching, caching, refreshing and outage behaviour are tested end to end
through the real verifier.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealedtorch.attest import Evidence, Tee, VerifierConfig, dcap
from sealedtorch.attest import collateral as C
from sealedtorch.attest import verify as front_door_verify
from sealedtorch.attest.collateral import model as collateral_model
from sealedtorch.attest.collateral import pccs as collateral_pccs
from sealedtorch.errors import AttestationError, CollateralError


def _evidence_dir() -> Path:
    env = os.environ.get("SEALEDTORCH_EVIDENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).parents[2] / ".." / "shared" / "evidence"


EVIDENCE = _evidence_dir()
if not (EVIDENCE / "sgx" / "quote.bin").is_file():  # fail loudly: these tests are the point
    raise RuntimeError(f"real DCAP evidence not found in {EVIDENCE} "
                       "(set SEALEDTORCH_EVIDENCE_DIR)")


@dataclass(frozen=True)
class Sample:
    tee: Tee
    quote_file: str
    collateral_file: str
    key: tuple[str, str]  # (FMSPC, CA)
    lo: int
    hi: int  # last valid second

    @property
    def quote(self) -> bytes:
        return (EVIDENCE / self.quote_file).read_bytes()

    @property
    def collateral(self) -> dict[str, str]:
        return json.loads((EVIDENCE / self.collateral_file).read_text())

    @property
    def mid(self) -> int:
        return (self.lo + self.hi) // 2

    @property
    def collateral_key(self) -> C.CollateralKey:
        return C.CollateralKey(self.tee, *self.key)


SGX = Sample(Tee.SGX, "sgx/quote.bin", "sgx/collateral.json", ("00A067110000", "processor"),
             1750330571, 1752919278)
TDX = Sample(Tee.TDX, "tdx/quote.bin", "tdx/collateral.json", ("B0C06F000000", "platform"),
             1750329147, 1752919234)
TDX2 = Sample(Tee.TDX, "tdx/second-quote.bin", "tdx/second-collateral.json",
              ("20A06F000000", "platform"), 1756798919, 1759388630)
TDX_OUTDATED = Sample(Tee.TDX, "tdx/outdated-quote.bin", "tdx/outdated-collateral.json",
                      ("90C06F000000", "platform"), 1771412331, 1774003274)
ALL = {"sgx": SGX, "tdx": TDX, "tdx-second": TDX2, "tdx-outdated": TDX_OUTDATED}
DAY = 24 * 3600


# --- a PCCS on 127.0.0.1 -------------------------------------------------------------------

@dataclass
class Pccs:
    """A small PCCS v4 server serving one sample's collateral; counts every request."""

    sample: Sample
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

    def start(self) -> Pccs:
        pccs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pccs.hits[self.path] += 1
                status, headers, body = pccs.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def pccs_routes(sample: Sample) -> dict[str, tuple[int, dict[str, str], bytes]]:
    """The sample's collateral as a PCCS v4 serves it."""
    col = sample.collateral
    tee = sample.tee.value
    fmspc, ca = sample.key

    def chain(pem: str) -> str:
        return urllib.parse.quote(pem, safe="")

    tcb_body = ('{"tcbInfo":' + col["tcb_info"] + ',"signature":"'
                + col["tcb_info_signature"] + '"}').encode()
    qe_body = ('{"enclaveIdentity":' + col["qe_identity"] + ',"signature":"'
               + col["qe_identity_signature"] + '"}').encode()
    return {
        f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der": (
            200, {"SGX-PCK-CRL-Issuer-Chain": chain(col["pck_crl_issuer_chain"]),
                  "Content-Type": "application/pkix-crl"}, bytes.fromhex(col["pck_crl"])),
        f"/{tee}/certification/v4/tcb?fmspc={fmspc}": (
            200, {"TCB-Info-Issuer-Chain": chain(col["tcb_info_issuer_chain"]),
                  "Content-Type": "application/json"}, tcb_body),
        f"/{tee}/certification/v4/qe/identity": (
            200, {"SGX-Enclave-Identity-Issuer-Chain": chain(col["qe_identity_issuer_chain"]),
                  "Content-Type": "application/json"}, qe_body),
        # PCCS serves the root CA CRL as hex text.
        "/sgx/certification/v4/rootcacrl": (200, {}, col["root_ca_crl"].encode()),
    }


@pytest.fixture
def make_pccs():
    servers: list[Pccs] = []

    def make(sample: Sample) -> Pccs:
        pccs = Pccs(sample, pccs_routes(sample)).start()
        servers.append(pccs)
        return pccs

    yield make
    for s in servers:
        s.stop()


def _config(url: str | None, cache_dir: Path | None) -> VerifierConfig:
    return VerifierConfig(pccs_url=url, cache_dir=cache_dir, http_timeout=5.0)


def _verify(sample: Sample, config: VerifierConfig, at: int):
    return dcap.verify(Evidence(tee=sample.tee, data=sample.quote), at=at, config=config)


def _cache_file(cache_dir: Path, sample: Sample) -> Path:
    return cache_dir / "dcap" / sample.collateral_key.filename


# --- parsing and validity windows ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL))
def test_windows_match_the_evidence_readme(name):
    sample = ALL[name]
    col = C.parse((EVIDENCE / sample.collateral_file).read_bytes())
    assert col.not_before == sample.lo
    assert col.not_after == sample.hi
    assert col.valid_at(sample.lo) and col.valid_at(sample.hi)
    assert not col.valid_at(sample.lo - 1) and not col.valid_at(sample.hi + 1)
    col.check_for(sample.collateral_key)


def test_check_valid_at_names_the_expired_item_and_time():
    col = C.parse(json.dumps(SGX.collateral))
    with pytest.raises(CollateralError) as info:
        col.check_valid_at(SGX.hi + 1)
    assert "QE identity expired at 2025-07-19T10:01:18Z (nextUpdate)" in str(info.value)
    assert "TCB info" not in str(info.value)  # not yet expired at that second
    with pytest.raises(CollateralError, match=r"not yet valid.*TCB info"):
        col.check_valid_at(SGX.lo - 1)


def test_crl_next_update_is_exclusive():
    col = C.parse(json.dumps(TDX.collateral))
    crl = next(i for i in col.items if i.name == "PCK CRL")
    assert crl.not_after == TDX.hi + 1  # README bound: the CRL's nextUpdate itself
    with pytest.raises(CollateralError, match="PCK CRL expired at 2025-07-19T10:00:35Z"):
        col.check_valid_at(crl.not_after)


def test_check_for_detects_every_kind_of_mismatch():
    sgx = C.parse(json.dumps(SGX.collateral))
    with pytest.raises(CollateralError, match="TCB info is for SGX"):
        sgx.check_for(TDX.collateral_key)
    with pytest.raises(CollateralError, match="FMSPC 00A067110000"):
        sgx.check_for(C.CollateralKey(Tee.SGX, "00A067110001", "processor"))
    with pytest.raises(CollateralError, match="PCK CRL is issued by"):
        sgx.check_for(C.CollateralKey(Tee.SGX, "00A067110000", "platform"))


@pytest.mark.parametrize(("field_name", "value", "match"), [
    ("pck_crl", "zz", "not hex"),
    ("pck_crl", "3000", "not a DER CRL"),
    ("tcb_info", "{", "not JSON"),
    ("tcb_info", "[]", "JSON objects"),
    ("qe_identity_signature", 5, "non-empty string"),
    ("tcb_info_issuer_chain", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "PEM"),
])
def test_parse_rejects_malformed_fields(field_name, value, match):
    obj = SGX.collateral
    obj[field_name] = value
    with pytest.raises(CollateralError, match=match):
        C.parse(json.dumps(obj))


def test_parse_rejects_bad_dates():
    obj = SGX.collateral
    tcb = json.loads(obj["tcb_info"])
    tcb["nextUpdate"] = "next tuesday"
    obj["tcb_info"] = json.dumps(tcb)
    with pytest.raises(CollateralError, match="TCB info nextUpdate"):
        C.parse(json.dumps(obj))


def test_collateral_key_validation():
    key = C.CollateralKey(Tee.SGX, "00a067110000", "Processor")
    assert (key.fmspc, key.ca, key.filename) == (
        "00A067110000", "processor", "sgx-00A067110000-processor.json")
    for bad in [("snp", "00A067110000", "processor"), ("sgx", "00A0671100", "processor"),
                ("sgx", "00A06711000G", "processor"), ("sgx", "00A067110000", "other")]:
        with pytest.raises((CollateralError, ValueError)):
            C.CollateralKey(Tee(bad[0]), bad[1], bad[2])


def test_load_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TDX.collateral))
    assert C.load_file(path).fmspc == "B0C06F000000"
    with pytest.raises(CollateralError, match="cannot read collateral file"):
        C.load_file(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(CollateralError, match=r"c\.json"):
        C.load_file(path)


# --- the PCCS client ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL))
def test_pccs_client_reassembles_the_exact_collateral(make_pccs, name):
    sample = ALL[name]
    pccs = make_pccs(sample)
    fetched = C.PccsClient(pccs.url, timeout=5).fetch(sample.collateral_key)
    assert dict(fetched.fields) == sample.collateral  # byte for byte, signatures intact
    assert pccs.requests == 4


def test_pccs_client_accepts_certification_path_in_base_url(make_pccs):
    pccs = make_pccs(SGX)
    client = C.PccsClient(pccs.url + "/sgx/certification/v4/", timeout=5)
    assert client.base_url == pccs.url
    assert client.fetch(SGX.collateral_key).fmspc == "00A067110000"


def test_pccs_client_falls_back_to_root_crl_distribution_point(make_pccs):
    pccs = make_pccs(SGX)
    crl = pccs.routes.pop("/sgx/certification/v4/rootcacrl")
    pccs.routes["/IntelSGXRootCA.der"] = (200, {}, bytes.fromhex(crl[2].decode()))  # DER
    client = C.PccsClient(pccs.url, timeout=5, root_ca_crl_url=pccs.url + "/IntelSGXRootCA.der")
    assert dict(client.fetch(SGX.collateral_key).fields) == SGX.collateral
    assert pccs.hits["/sgx/certification/v4/rootcacrl"] == 1
    assert pccs.hits["/IntelSGXRootCA.der"] == 1
    assert C.PccsClient("https://pccs.example").root_ca_crl_url == (
        "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der")


def test_pccs_client_accepts_pem_crl_and_legacy_header(make_pccs):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pccs = make_pccs(SGX)
    path = "/sgx/certification/v4/pckcrl?ca=processor&encoding=der"
    status, headers, der = pccs.routes[path]
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    pccs.routes[path] = (status, headers, pem)
    tcb = "/sgx/certification/v4/tcb?fmspc=00A067110000"
    status, headers, body = pccs.routes[tcb]
    pccs.routes[tcb] = (status, {"SGX-TCB-Info-Issuer-Chain":
                                 headers["TCB-Info-Issuer-Chain"]}, body)
    assert dict(C.PccsClient(pccs.url).fetch(SGX.collateral_key).fields) == SGX.collateral


@pytest.mark.parametrize(("route", "change", "match"), [
    ("tcb", lambda r: (404, {}, b""), r"TCB info .*HTTP 404"),
    ("tcb", lambda r: (500, r[1], r[2]), r"TCB info .*HTTP 500"),
    ("tcb", lambda r: (200, {}, r[2]), "issuer chain header"),
    ("tcb", lambda r: (200, r[1], b'{"tcbInfo": {}'), "malformed TCB info"),
    ("tcb", lambda r: (200, r[1], b'{"tcbInfo": {}, "signature": 5}'), "signature"),
    ("qe", lambda r: (200, r[1], b'{"signature": "00"}'), "enclaveIdentity"),
    ("pckcrl", lambda r: (200, r[1], b"\xff\xfe"), "neither DER, PEM nor hex"),
    ("rootcacrl", lambda r: (503, {}, b""), r"root CA CRL .*HTTP 503"),
])
def test_pccs_client_reports_what_failed(make_pccs, route, change, match):
    pccs = make_pccs(SGX)
    path = next(p for p in pccs.routes if route in p)
    pccs.routes[path] = change(pccs.routes[path])
    with pytest.raises(CollateralError, match=match):
        C.PccsClient(pccs.url, timeout=5).fetch(SGX.collateral_key)


def test_pccs_client_refuses_collateral_for_another_platform(make_pccs):
    pccs = make_pccs(TDX)
    # Serve TDX2's TCB info under TDX's FMSPC: a PCCS answering for the wrong platform.
    other = pccs_routes(TDX2)["/tdx/certification/v4/tcb?fmspc=20A06F000000"]
    pccs.routes["/tdx/certification/v4/tcb?fmspc=B0C06F000000"] = other
    with pytest.raises(CollateralError, match="FMSPC"):
        C.PccsClient(pccs.url, timeout=5).fetch(TDX.collateral_key)


def test_raw_json_members_are_cut_out_verbatim():
    body = ' { "tcbInfo" : {"b":1, "a" : [1, 2]} ,\n "signature":"ab" } '
    parts = collateral_pccs._top_level_raw(body, "TCB info")
    assert parts == {"tcbInfo": '{"b":1, "a" : [1, 2]}', "signature": '"ab"'}
    for bad in ["", "[]", '{"a" 1}', '{"a":1 "b":2}', '{"a":1} x', "{1:2}"]:
        with pytest.raises(CollateralError):
            collateral_pccs._top_level_raw(bad, "TCB info")


# --- fetch, cache, refresh, outage (through the real verifier) ----------------------------

@pytest.mark.parametrize("name", ["sgx", "tdx", "tdx-second"])
def test_fetch_then_cache(make_pccs, tmp_path, name):
    sample = ALL[name]
    pccs = make_pccs(sample)
    config = _config(pccs.url, tmp_path)
    claims = _verify(sample, config, sample.mid)
    assert claims.tee is sample.tee and claims.fmspc == sample.key[0]
    assert pccs.requests == 4
    entry = json.loads(_cache_file(tmp_path, sample).read_text())
    assert entry["fetched_at"] == sample.mid
    assert entry["source"] == pccs.url
    assert entry["collateral"] == sample.collateral
    assert sorted(p.name for p in (tmp_path / "dcap").iterdir()) == [
        sample.collateral_key.filename]  # no temporary files left behind

    # Second verification: from the cache, no network round trip.
    again = _verify(sample, config, sample.mid + 3600)
    assert again == claims
    assert pccs.requests == 4


def test_cache_alone_is_enough(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    _verify(SGX, _config(pccs.url, tmp_path), SGX.mid)
    pccs.stop()
    claims = front_door_verify(Evidence(tee=Tee.SGX, data=SGX.quote), at=SGX.mid + 60,
                               config=_config(None, tmp_path))
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    # Older than the refresh interval, but still valid and nothing to refresh from: used.
    assert _verify(SGX, _config(None, tmp_path), SGX.mid + 3 * DAY).report_data


def test_stale_cache_is_refreshed_after_the_refresh_interval(make_pccs, tmp_path):
    pccs = make_pccs(TDX)
    config = _config(pccs.url, tmp_path)
    t0 = TDX.lo + 60
    _verify(TDX, config, t0)
    assert pccs.requests == 4
    _verify(TDX, config, t0 + C.DEFAULT_REFRESH_INTERVAL - 1)
    assert pccs.requests == 4
    t1 = t0 + C.DEFAULT_REFRESH_INTERVAL
    _verify(TDX, config, t1)
    assert pccs.requests == 8
    assert json.loads(_cache_file(tmp_path, TDX).read_text())["fetched_at"] == t1


def test_cache_past_next_update_is_refreshed(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    config = _config(pccs.url, tmp_path)
    _verify(SGX, config, SGX.hi - 60)
    assert pccs.requests == 4
    # One minute later the QE identity is past its nextUpdate: the verifier asks again.
    # This PCCS only has the same (now expired) collateral, so verification must fail,
    # naming what expired.
    with pytest.raises(CollateralError, match="QE identity expired at 2025-07-19T10:01:18Z"):
        _verify(SGX, config, SGX.hi + 1)
    assert pccs.requests == 8


def test_server_down_with_valid_cache_still_verifies(make_pccs, tmp_path, caplog):
    pccs = make_pccs(SGX)
    config = _config(pccs.url, tmp_path)
    _verify(SGX, config, SGX.lo)
    pccs.stop()
    with caplog.at_level(logging.WARNING, logger="sealedtorch.attest.collateral"):
        claims = _verify(SGX, config, SGX.lo + 2 * DAY)  # stale by age, refresh fails
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert "refresh failed" in caplog.text


def test_server_down_with_expired_cache_is_a_collateral_error(make_pccs, tmp_path):
    pccs = make_pccs(TDX)
    config = _config(pccs.url, tmp_path)
    _verify(TDX, config, TDX.mid)
    pccs.stop()
    with pytest.raises(CollateralError) as info:
        _verify(TDX, config, TDX.hi + 1)
    msg = str(info.value)
    assert "expired" in msg
    assert "PCK CRL expired at 2025-07-19T10:00:35Z" in msg
    assert "refresh failed" in msg and "cannot fetch" in msg


def test_server_down_and_nothing_cached(tmp_path, make_pccs):
    pccs = make_pccs(SGX)
    url = pccs.url
    pccs.stop()
    with pytest.raises(CollateralError, match=r"nothing cached.*cannot fetch"):
        _verify(SGX, _config(url, tmp_path), SGX.mid)
    with pytest.raises(CollateralError, match="cannot fetch"):
        _verify(SGX, _config(url, None), SGX.mid)


def test_expired_cache_without_source(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    _verify(SGX, _config(pccs.url, tmp_path), SGX.mid)
    with pytest.raises(CollateralError, match=r"expired.*no pccs_url"):
        _verify(SGX, _config(None, tmp_path), SGX.hi + 1)
    with pytest.raises(CollateralError, match="nothing cached"):
        _verify(TDX, _config(None, tmp_path), TDX.mid)


def test_corrupt_cache_entry_is_refetched(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    config = _config(pccs.url, tmp_path)
    _verify(SGX, config, SGX.mid)
    path = _cache_file(tmp_path, SGX)
    path.write_text("{ half a file")
    _verify(SGX, config, SGX.mid + 60)
    assert pccs.requests == 8
    assert json.loads(path.read_text())["fetched_at"] == SGX.mid + 60


def test_cache_entry_for_another_key_is_ignored(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    config = _config(pccs.url, tmp_path)
    _verify(SGX, config, SGX.mid)
    # Copy the SGX entry under the TDX key: the cache must not serve it for TDX.
    (tmp_path / "dcap" / TDX.collateral_key.filename).write_bytes(
        _cache_file(tmp_path, SGX).read_bytes())
    assert C.CollateralCache(tmp_path).get(TDX.collateral_key) is None


def test_evidence_collateral_takes_precedence_when_the_verifier_preference_is_off(make_pccs,
                                                                                 tmp_path):
    # issue 11 §3 made the verifier's own collateral the default: this is now opt-in
    pccs = make_pccs(SGX)
    ev = Evidence(tee=Tee.SGX, data=SGX.quote,
                  collateral=(EVIDENCE / SGX.collateral_file).read_bytes())
    config = VerifierConfig(pccs_url=pccs.url, cache_dir=tmp_path, http_timeout=5.0,
                            prefer_verifier_collateral=False)
    dcap.verify(ev, at=SGX.mid, config=config)
    assert pccs.requests == 0
    assert not (tmp_path / "dcap").exists()


def test_file_source(tmp_path):
    directory = tmp_path / "collateral"
    directory.mkdir()
    for sample in (SGX, TDX):
        (directory / sample.collateral_key.filename).write_text(json.dumps(sample.collateral))
    config = _config(directory.as_uri(), None)
    assert _verify(SGX, config, SGX.mid).fmspc == "00A067110000"
    assert _verify(TDX, config, TDX.mid).fmspc == "B0C06F000000"
    with pytest.raises(CollateralError, match="cannot read collateral file"):
        _verify(TDX2, config, TDX2.mid)
    single = _config((directory / SGX.collateral_key.filename).as_uri(), None)
    assert _verify(SGX, single, SGX.mid).report_data
    with pytest.raises(CollateralError, match="mismatch"):
        _verify(TDX, single, TDX.mid)


def test_unsupported_source_scheme():
    with pytest.raises(CollateralError, match="http"):
        _verify(SGX, _config("ftp://pccs.example", None), SGX.mid)


def test_tampered_pccs_answer_fails_verification(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    path = "/sgx/certification/v4/tcb?fmspc=00A067110000"
    status, headers, body = pccs.routes[path]
    pccs.routes[path] = (status, headers,
                         body.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"'))
    with pytest.raises(AttestationError, match="TCB info signature invalid"):
        _verify(SGX, _config(pccs.url, tmp_path), SGX.mid)


def test_concurrent_writers_never_expose_half_a_file(tmp_path):
    cache = C.CollateralCache(tmp_path)
    key = SGX.collateral_key
    col = C.parse(json.dumps(SGX.collateral))
    cache.put(key, col, fetched_at=1, source="test")
    stop = threading.Event()
    failures: list[str] = []

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            cache.put(key, col, fetched_at=n * 1_000_000 + i, source="test")

    def reader() -> None:
        for _ in range(200):
            if cache.get(key) is None:
                failures.append("partial or missing entry")

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    reader()
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert [p.name for p in (tmp_path / "dcap").iterdir()] == [key.filename]


# --- issue 11 §3: whose collateral, how recent, and typed parse failures ----------------------

def test_verifier_collateral_is_preferred_over_what_the_attester_sends(make_pccs, tmp_path):
    pccs = make_pccs(SGX)
    # the attester sends collateral for another platform (it could as well be an older TCB
    # recovery that still carries a valid date): the verifier uses its own PCCS instead
    ev = Evidence(tee=Tee.SGX, data=SGX.quote,
                  collateral=(EVIDENCE / TDX.collateral_file).read_bytes())
    claims = dcap.verify(ev, at=SGX.mid, config=_config(pccs.url, tmp_path))
    assert claims.fmspc == "00A067110000" and pccs.requests > 0
    off = VerifierConfig(pccs_url=pccs.url, cache_dir=tmp_path,
                         prefer_verifier_collateral=False)
    with pytest.raises(CollateralError, match="collateral in the evidence: collateral mismatch"):
        dcap.verify(ev, at=SGX.mid, config=off)


def test_the_attesters_collateral_is_the_fallback_when_the_verifier_has_none(tmp_path):
    ev = Evidence(tee=Tee.SGX, data=SGX.quote,
                  collateral=(EVIDENCE / SGX.collateral_file).read_bytes())
    down = _config("http://127.0.0.1:9", tmp_path)  # nothing listens on the discard port
    assert dcap.verify(ev, at=SGX.mid, config=down).fmspc == "00A067110000"
    bad = Evidence(tee=Tee.SGX, data=SGX.quote,
                   collateral=(EVIDENCE / TDX.collateral_file).read_bytes())
    with pytest.raises(CollateralError, match="own collateral was not usable either"):
        dcap.verify(bad, at=SGX.mid, config=down)


@pytest.mark.parametrize("sample", [SGX, TDX], ids=["sgx", "tdx"])
def test_min_tcb_evaluation_data_number_accepts_the_real_collateral_at_its_number(sample):
    assert C.parse(json.dumps(sample.collateral)).tcb_evaluation_data_numbers == {
        "TCB info": 17, "QE identity": 17}
    ev = Evidence(tee=sample.tee, data=sample.quote,
                  collateral=(EVIDENCE / sample.collateral_file).read_bytes())
    assert dcap.verify(ev, at=sample.mid,
                       config=VerifierConfig(min_tcb_evaluation_data_number=17)).report_data


@pytest.mark.parametrize("sample", [SGX, TDX], ids=["sgx", "tdx"])
def test_collateral_older_than_the_required_tcb_recovery_is_refused(sample, make_pccs,
                                                                    tmp_path):
    ev = Evidence(tee=sample.tee, data=sample.quote,
                  collateral=(EVIDENCE / sample.collateral_file).read_bytes())
    message = ("tcbEvaluationDataNumber must be >= 18, but TCB info has 17; QE identity "
               "has 17")
    with pytest.raises(CollateralError, match=message):
        dcap.verify(ev, at=sample.mid, config=VerifierConfig(min_tcb_evaluation_data_number=18))
    pccs = make_pccs(sample)  # the same from the verifier's own source
    config = VerifierConfig(pccs_url=pccs.url, cache_dir=tmp_path,
                            min_tcb_evaluation_data_number=18)
    with pytest.raises(CollateralError, match=message):
        dcap.verify(Evidence(tee=sample.tee, data=sample.quote), at=sample.mid, config=config)


def test_a_non_integer_tcb_evaluation_data_number_is_a_collateral_error():
    col = SGX.collateral
    tcb = json.loads(col["tcb_info"])
    tcb["tcbEvaluationDataNumber"] = "17"
    with pytest.raises(CollateralError, match="tcbEvaluationDataNumber '17'"):
        C.parse(json.dumps({**col, "tcb_info": json.dumps(tcb)}))


def _mangled(field_name: str) -> dict[str, str]:
    """The three malformed collateral inputs that used to escape as a raw ValueError (or
    cryptography's InvalidVersion): cryptography reads these fields lazily."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    col = SGX.collateral
    if field_name == "pck_crl":  # the CRL issuer's CN string gets an impossible tag
        der = bytearray(bytes.fromhex(col["pck_crl"]))
        at = der.find(b"Intel SGX PCK") - 2
        assert der[at] == 0x0C
        der[at] = 0x4C
        return {**col, "pck_crl": der.hex()}
    if field_name == "root_ca_crl":  # CRL version 46
        der = bytearray(bytes.fromhex(col["root_ca_crl"]))
        assert der[7:10] == b"\x02\x01\x01"
        der[9] = 0x2E
        return {**col, "root_ca_crl": der.hex()}
    assert field_name == "tcb_info_issuer_chain"  # the signing certificate's subject CN
    certs = x509.load_pem_x509_certificates(col[field_name].encode())
    der = bytearray(certs[0].public_bytes(Encoding.DER))
    at = der.find(b"Intel SGX TCB Signing") - 2
    assert der[at] == 0x0C
    der[at] = 0x4C
    import base64
    import textwrap
    pem = ("-----BEGIN CERTIFICATE-----\n"
           + "\n".join(textwrap.wrap(base64.b64encode(bytes(der)).decode(), 64))
           + "\n-----END CERTIFICATE-----\n")
    rest = "".join(c.public_bytes(Encoding.PEM).decode() for c in certs[1:])
    return {**col, field_name: pem + rest}


@pytest.mark.parametrize("field_name", ["pck_crl", "root_ca_crl", "tcb_info_issuer_chain"])
def test_malformed_collateral_is_a_typed_collateral_error(field_name):
    with pytest.raises(CollateralError, match="collateral parse error"):
        C.parse(json.dumps(_mangled(field_name)))


@pytest.mark.parametrize("field_name", ["pck_crl", "root_ca_crl", "tcb_info_issuer_chain"])
def test_malformed_collateral_in_evidence_is_refused_by_the_front_door_not_crashed(field_name):
    ev = Evidence(tee=Tee.SGX, data=SGX.quote,
                  collateral=json.dumps(_mangled(field_name)).encode())
    with pytest.raises(CollateralError, match="collateral in the evidence"):
        front_door_verify(ev, at=SGX.mid)


_MUTATION = st.tuples(st.sampled_from(C.FIELDS), st.integers(0, 10_000),
                      st.sampled_from(["flip", "cut", "char"]), st.integers(0, 255))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=_MUTATION)
def test_every_collateral_parse_failure_is_a_collateral_error(mutation):
    name, position, kind, value = mutation
    col = SGX.collateral
    text = col[name]
    if name in collateral_model._HEX_FIELDS and kind == "flip":
        raw = bytearray(bytes.fromhex(text))
        raw[position % len(raw)] ^= value or 1
        text = raw.hex()
    elif kind == "cut":
        text = text[:position % len(text)]
    else:
        pos = position % len(text)
        text = text[:pos] + chr(32 + value % 95) + text[pos + 1:]
    try:
        C.parse(json.dumps({**col, name: text}))
    except CollateralError:
        pass
