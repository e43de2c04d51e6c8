"""Issue 11 §5: floods cost the attacker, not the audit log.

A real keyserver on 127.0.0.1; the flood comes from client threads over TLS."""

from __future__ import annotations

import dataclasses
import threading

import httpx
import pytest

from sealedtorch.attest import sim
from sealedtorch.keyserver import server
from sealedtorch.keyserver.audit_recorder import FAILURE_BUDGET, FailureSampler
from sealedtorch.keyserver.tls import client_context

MALFORMED = [
    (b"{not json", {"Content-Type": "application/json"}),
    (b'{"nonce": 1, "tee": "sim"}', {"Content-Type": "application/json"}),
    (b'{"nonce": "AA==", "tee": "sim", "evidence": "!!", "public_key": "AA=="}',
     {"Content-Type": "application/json"}),
]


def _flood(url: str, ca, n: int, threads: int = 4) -> list[int]:
    codes: list[int] = []
    lock = threading.Lock()

    def go(k: int) -> None:
        with httpx.Client(base_url=url, verify=client_context(ca), timeout=30) as http:
            for i in range(k, n, threads):
                body, headers = MALFORMED[i % len(MALFORMED)]
                code = http.post("/v1/attest", content=body, headers=headers).status_code
                with lock:
                    codes.append(code)

    workers = [threading.Thread(target=go, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    return codes


def test_a_malformed_flood_grows_the_audit_log_by_at_most_the_budget(ks, model_id):
    """600 malformed /v1/attest requests past the rate limiter: at most FAILURE_BUDGET
    individual records plus one summary; a legitimate client is served during and after."""
    cfg = dataclasses.replace(ks.init.config, rate_limit=None)
    key = ks.register(model_id)
    with server.BackgroundServer.start(cfg, clock=ks.clock,
                                       trust_sim_roots=[ks.tmp / "sim" / sim.PUB_FILE]) as srv:
        srv.service.failures.window = 3600.0  # one window for the whole flood
        before = ks.audit_count()
        served: list[bool] = []

        def legitimate() -> None:
            from sealedtorch.keyserver.client import AttestedKeyClient

            with AttestedKeyClient(srv.url, ks.ca, ks.attester()) as client:
                served.append(client.fetch(model_id).model_key == key)

        during = threading.Thread(target=legitimate)
        during.start()
        codes = _flood(srv.url, ks.ca, 600)
        during.join(timeout=120)
        assert len(codes) == 600 and set(codes) == {400}
        grown = ks.audit_count() - before
        assert grown == FAILURE_BUDGET + 2  # + the legitimate attestation and release
        legitimate()
        assert served == [True, True]

        # the window closes: one summary counts what was left out, nothing is lost
        srv.service.failures.window = 0.0
        with httpx.Client(base_url=srv.url, verify=client_context(ks.ca), timeout=10) as h:
            metrics = h.get("/metrics").text
        summary = ks.last_audit()
        assert summary["event"] == "audit.failures.suppressed"
        assert summary["suppressed_total"] == 600 - FAILURE_BUDGET
        assert {s["event"] for s in summary["suppressed"]} == {"attest"}
        # budget + the summary + two legitimate attestations and releases
        assert ks.audit_count() - before == FAILURE_BUDGET + 1 + 4
        assert f'sealedtorch_keyserver_audit_suppressed_total{{event="attest"}} ' \
               f'{600 - FAILURE_BUDGET}' in metrics


def test_the_rate_limit_refuses_a_malformed_flood_before_parsing_it(ks):
    cfg = dataclasses.replace(ks.init.config, rate_limit=(0.2, 3))
    with server.BackgroundServer.start(cfg, clock=ks.clock) as srv, \
            httpx.Client(base_url=srv.url, verify=client_context(ks.ca), timeout=10) as http:
        before = ks.audit_count()
        codes = [http.post("/v1/attest", content=b"{not json",
                           headers={"Content-Type": "application/json"}).status_code
                 for _ in range(8)]
        assert codes == [400] * 3 + [429] * 5
        assert ks.audit_count() == before + 3  # the five refused by the limit: never read
        r = http.post("/v1/attest/challenge", content=b"\xff" * 10)
        assert r.status_code == 429 and r.json()["problem"] == "rate-limited"
        assert int(r.headers["retry-after"]) >= 1


def test_authenticated_and_integrity_failures_are_always_recorded():
    sampler = FailureSampler(budget=2, window=60.0, clock=lambda: 0.0)
    assert [sampler.admit("attest", "bad-request")[0] for _ in range(4)] == \
        [True, True, False, False]
    now = [0.0]
    sampler = FailureSampler(budget=1, window=10.0, clock=lambda: now[0])
    assert sampler.admit("attest", "nonce") == (True, None)
    assert sampler.admit("attest", "nonce")[0] is False
    assert sampler.flush() is None  # the window is still open
    now[0] = 11.0
    summary = sampler.flush()
    assert summary is not None and summary["suppressed_total"] == 1
    assert sampler.admit("attest", "nonce") == (True, None)  # a fresh window


@pytest.mark.parametrize("header", ["Bearer sta_" + "A" * 43, "Bearer x.y.z"])
def test_bad_bearer_tokens_are_sampled_like_other_unauthenticated_failures(ks, header):
    srv_service = ks.srv.service
    saved = srv_service.failures
    srv_service.failures = FailureSampler(budget=1, window=3600.0)
    try:
        before = ks.audit_count()
        with ks.http() as http:
            path = "/v1/admin/models" if "sta_" in header else "/v1/keys"
            codes = [http.get(path, headers={"Authorization": header}).status_code
                     for _ in range(20)]
        assert set(codes) == {401}
        assert ks.audit_count() == before + 1
    finally:
        srv_service.failures = saved
