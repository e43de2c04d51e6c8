"""The verifying client: evidence checked against a policy, TLS key pinned on every
connection, and nothing sent unless both hold."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from sealedtorch import crypto
from sealedtorch.attest import VerifierConfig
from sealedtorch.attest.policy import load_policy
from sealedtorch.attest.sim import init_platform
from sealedtorch.cli import main
from sealedtorch.errors import AttestationError, BindingError, PolicyDenied
from sealedtorch.runtime import attestation
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement

PUB = "platform.pub"


def requests_seen(srv, model: str) -> float:
    return sum(srv.runtime.metrics.requests.value(model=model, code=c)
               for c in ("200", "400", "413", "503"))


class SwitchingProxy:
    """A loopback TCP relay whose upstream can be switched (an on-path attacker that lets
    the attestation through and then routes the data elsewhere)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            a.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[type[SwitchingProxy]]:
    made: list[SwitchingProxy] = []

    def make(upstream: tuple[str, int]) -> SwitchingProxy:
        p = SwitchingProxy(upstream)
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        p.close()


def addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def test_attest_then_infer_over_the_pinned_connection(start_server, tiny, tiny_source,
                                                      sim_dir, policy_for):
    srv = start_server([tiny_source], keys=tiny.keys)
    with AttestedClient(srv.url, policy=policy_for(), sim_roots=[sim_dir / PUB]) as client:
        result = client.attest()
        assert result.decision.allowed and result.spki == srv.spki
        assert result.claims.tee == "sim"
        assert result.model("tiny") == {"name": "tiny", "model_id": "tiny-mlp",
                                        "key_version": 1,
                                        "arch": "sealedtorch.runtime.architectures:mlp",
                                        "ready": True, "pin": None,
                                        "file_sha256": crypto.sha256_file(tiny.path).hex()}
        assert result.runtime["config"] == json.loads(RuntimeConfig().canonical_bytes())
        x = torch.randn(6, 4)
        with torch.inference_mode():
            expected = tiny.module(x)
        assert torch.equal(client.infer("tiny", x)["output"], expected)
        assert torch.equal(client.infer("tiny", {"input": x.double()}, binary=False)["output"],
                           expected)  # cast to the declared FP32
        with pytest.raises(AttestationError, match="does not serve model 'other'"):
            client.infer("other", x)


def test_policy_the_server_does_not_satisfy_sends_nothing(start_server, tiny, tiny_source,
                                                          sim_dir):
    srv = start_server([tiny_source], keys=tiny.keys)
    other = runtime_measurement(RuntimeConfig(max_batch_size=1)).hex()
    policy = {"allow": [{"tee": "sim", "measurement": other}]}
    client = AttestedClient(srv.url, policy=policy, sim_roots=[sim_dir / PUB])
    with pytest.raises(PolicyDenied, match="measurement: expected"):
        client.infer("tiny", torch.randn(1, 4))
    assert client.pinned_spki is None
    assert requests_seen(srv, "tiny") == 0
    client.close()


def test_untrusted_sim_platform_is_refused(start_server, tiny, tiny_source, tmp_path,
                                           policy_for):
    srv = start_server([tiny_source], keys=tiny.keys)
    stranger = init_platform(tmp_path / "stranger")
    client = AttestedClient(srv.url, policy=policy_for(),
                            sim_roots=[stranger.directory / PUB])
    with pytest.raises(AttestationError, match="not among the 1 this relying party trusts"):
        client.infer("tiny", torch.randn(1, 4))
    assert requests_seen(srv, "tiny") == 0


def test_switched_server_after_attestation_gets_no_data(start_server, tiny, tiny_source,
                                                        sim_dir, policy_for, proxy):
    """Attest server A through a relay, then the relay sends traffic to server B (same code,
    same measurement, same platform, but another TLS key): the handshake fails on the pin
    before any request byte is written."""
    a = start_server([tiny_source], keys=tiny.keys)
    b = start_server([tiny_source], keys=tiny.keys)
    assert a.spki != b.spki
    relay = proxy(addr(a.url))
    client = AttestedClient(f"https://127.0.0.1:{relay.port}", policy=policy_for(),
                            sim_roots=[sim_dir / PUB])
    client.attest()
    client.infer("tiny", torch.randn(1, 4))
    assert requests_seen(a, "tiny") == 1
    relay.upstream = addr(b.url)
    client.reconnect()  # new connections, same pin: they now reach B
    with pytest.raises(BindingError, match="other than the attested one; nothing was sent"):
        client.infer("tiny", torch.randn(1, 4))
    assert requests_seen(b, "tiny") == 0
    assert requests_seen(a, "tiny") == 1
    client.close()


def test_evidence_for_another_key_is_refused(start_server, tiny, tiny_source, sim_dir,
                                             policy_for, proxy):
    """A relay that answers the attestation request with server B's document while the TLS
    connection is A's: the document names B's key, the connection shows A's."""
    a = start_server([tiny_source], keys=tiny.keys)
    b = start_server([tiny_source], keys=tiny.keys)
    nonce = b"\x07" * 32
    doc = httpx.get(f"{b.url}/v1/attestation", params={"nonce": nonce.hex()},
                    verify=False).json()
    doc["tls_spki"] = base64.b64encode(a.spki).decode()  # lie about the key
    verifier = VerifierConfig(sim_platform_keys=(crypto.load_ed25519_public(
        (sim_dir / PUB).read_bytes()),))
    with pytest.raises(BindingError, match="not bound to this challenge"):
        attestation.verify_document(doc, nonce=nonce, connection_spki=a.spki,
                                    policy=load_policy(policy_for()), verifier=verifier)
    with pytest.raises(BindingError, match="not bound to this challenge"):  # stale nonce
        attestation.verify_document(
            {**doc, "tls_spki": base64.b64encode(b.spki).decode()}, nonce=b"\x08" * 32,
            connection_spki=b.spki, policy=load_policy(policy_for()), verifier=verifier)


def test_attestation_endpoint_rejects_bad_nonces(start_server, tiny, tiny_source, raw_client):
    srv = start_server([tiny_source], keys=tiny.keys)
    c = raw_client(srv.url)
    assert c.get("/v1/attestation").status_code == 400
    r = c.get("/v1/attestation", params={"nonce": "abcd"})
    assert r.status_code == 400 and "32 bytes" in r.json()["error"]
    assert c.get("/v1/attestation", params={"nonce": "ab" * 32}).status_code == 200


def test_cli_client_infer(start_server, tiny, tiny_source, sim_dir, policy_for, tmp_path,
                          capsys):
    srv = start_server([tiny_source], keys=tiny.keys)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_for()))
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npz"
    rc = main(["client", "infer", "--url", srv.url, "--policy", str(policy), "--model", "tiny",
               "--input", str(tmp_path / "x.npy"), "--sim-root", str(sim_dir / PUB),
               "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "attested: sim runtime" in captured.err and "TLS key pinned" in captured.err
    with torch.inference_mode():
        expected = tiny.module(torch.from_numpy(x)).numpy()
    assert np.array_equal(np.load(out)["output"], expected)
    printed = json.loads(captured.out)["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in printed] == [
        ("output", "FP32", [2, 3])]
    assert printed[0]["data"] == expected.reshape(-1).tolist()

    policy.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": "00" * 48}]}))
    rc = main(["client", "infer", "--url", srv.url, "--policy", str(policy), "--model", "tiny",
               "--input", str(tmp_path / "x.npy"), "--sim-root", str(sim_dir / PUB)])
    assert rc == 1
    assert "denied" in capsys.readouterr().err
    assert requests_seen(srv, "tiny") == 1


def test_cli_print_measurement_matches_the_running_server(capsys, tmp_path):
    assert main(["serve", "--print-measurement"]) == 0
    assert capsys.readouterr().out.strip() == runtime_measurement(RuntimeConfig()).hex()
    assert main(["serve", "--print-config", "--device", "auto"]) == 0
    canonical = capsys.readouterr().out
    (tmp_path / "c.json").write_text(canonical)
    assert main(["attest", "measure", "--config", str(tmp_path / "c.json")]) == 0
    expected = runtime_measurement(RuntimeConfig(device="auto")).hex()
    assert expected in capsys.readouterr().out


def test_cli_client_infer_prints_one_layout_for_small_and_large_outputs(
        start_server, recorder, sim_dir, policy_for, tmp_path, capsys):
    srv = start_server([recorder("rec")])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_for()))
    printed = []
    for rows in (1, 50):  # 2 values, then 100: more than are printed
        np.save(tmp_path / "x.npy", np.ones((rows, 2), dtype=np.float32))
        rc = main(["client", "infer", "--url", srv.url, "--policy", str(policy), "--model",
                   "rec", "--input", str(tmp_path / "x.npy"), "--sim-root",
                   str(sim_dir / PUB), "--output", str(tmp_path / "y.json")])
        assert rc == 0
        printed.append(json.loads(capsys.readouterr().out)["outputs"][0])
    small, large = printed
    assert small.keys() == large.keys() == {"name", "datatype", "shape", "data", "elements",
                                            "truncated"}
    assert (small["datatype"], small["shape"], small["elements"], small["truncated"]) == (
        "FP32", [1, 2], 2, False)
    assert (large["shape"], large["elements"], large["truncated"], len(large["data"])) == (
        [50, 2], 100, True, 64)
    written = json.loads((tmp_path / "y.json").read_text())["y"]
    assert written["datatype"] == "FP32" and len(written["data"]) == 50


def test_cli_client_cert_writes_the_attested_certificate(start_server, tiny, tiny_source,
                                                         sim_dir, policy_for, tmp_path,
                                                         capsys):
    from sealedtorch.runtime.client import pinned_ssl_context

    srv = start_server([tiny_source], keys=tiny.keys)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_for()))
    out = tmp_path / "runtime.pem"
    rc = main(["client", "cert", "--url", srv.url, "--policy", str(policy), "--sim-root",
               str(sim_dir / PUB), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["tls_spki_sha256"] == crypto.sha256(srv.spki).hex()
    assert crypto.tls_certificate_spki(out.read_bytes()) == srv.spki
    with httpx.Client(base_url=srv.url, verify=pinned_ssl_context(out.read_bytes())) as c:
        assert c.get("/v2/health/live").status_code == 200


def test_cli_client_cert_writes_nothing_when_the_policy_denies(start_server, tiny,
                                                               tiny_source, sim_dir,
                                                               tmp_path, capsys):
    srv = start_server([tiny_source], keys=tiny.keys)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": "00" * 48}]}))
    out = tmp_path / "runtime.pem"
    rc = main(["client", "cert", "--url", srv.url, "--policy", str(policy), "--sim-root",
               str(sim_dir / PUB), "--out", str(out)])
    assert rc == 1 and "denied" in capsys.readouterr().err
    assert not out.exists()
