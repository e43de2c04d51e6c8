"""`sealedtorch attest verify | measure` and `sim init` on real evidence."""

from __future__ import annotations

import json

import pytest

from sealedtorch.cli import main


def _verify(evidence, *args: str) -> list[str]:
    return ["attest", "verify", "--tee", "sgx", "--evidence", str(evidence / "sgx/quote.bin"),
            "--collateral", str(evidence / "sgx/collateral.json"), "--at", "1751000000", *args]


def test_verify_prints_claims_as_json_and_exits_0(evidence, capsys):
    assert main(_verify(evidence, "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["claims"]["tee"] == "sgx"
    assert out["claims"]["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_verify_with_a_denying_policy_exits_1_with_reasons(evidence, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("allow:\n  - tee: sgx\n    mr_signer: '" + "ab" * 32 + "'\n")
    assert main(_verify(evidence, "--policy", str(tmp_path / "p.yaml"))) == 1
    out = capsys.readouterr().out
    assert "DENIED" in out and "mr_signer" in out


def test_verify_outside_the_collateral_window_exits_2(evidence, capsys):
    args = _verify(evidence)
    args[args.index("1751000000")] = "1800000000"
    assert main(args) == 2
    assert "CollateralError" in capsys.readouterr().err


def test_verify_of_a_tampered_quote_exits_2(evidence, tmp_path, capsys):
    raw = bytearray((evidence / "sgx/quote.bin").read_bytes())
    raw[100] ^= 1
    (tmp_path / "q.bin").write_bytes(raw)
    args = _verify(evidence)
    args[args.index(str(evidence / "sgx/quote.bin"))] = str(tmp_path / "q.bin")
    assert main(args) == 2
    assert "AttestationError" in capsys.readouterr().err


def test_verify_snp_report_with_vcek_and_chain(evidence, capsys):
    with pytest.warns(Warning):
        rc = main(["attest", "verify", "--tee", "snp",
                   "--evidence", str(evidence / "snp/milan-report.bin"),
                   "--vcek", str(evidence / "snp/milan-vcek.der"),
                   "--chain", str(evidence / "snp/milan-ask-ark.pem"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["claims"]["tee"] == "snp"


def test_sim_init_measure_and_verify(tmp_path, capsys):
    assert main(["sim", "init", "--out", str(tmp_path / "sim")]) == 0
    assert main(["attest", "measure", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    measurement = json.loads(lines[-1])["measurement"]
    from sealedtorch.attest.sim import SimPlatform

    ev = SimPlatform.load(tmp_path / "sim").sign_evidence(bytes(64),
                                                          measurement=bytes.fromhex(measurement))
    (tmp_path / "ev.bin").write_bytes(ev.data)
    base = ["attest", "verify", "--tee", "sim", "--evidence", str(tmp_path / "ev.bin")]
    assert main(base) == 2  # no trusted sim key configured
    assert "refused unless the relying party trusts" in capsys.readouterr().err
    assert main([*base, "--sim-root", str(tmp_path / "sim/platform.pub")]) == 0
    assert "INSECURE" in capsys.readouterr().out


def test_sim_init_refuses_to_overwrite_a_platform(tmp_path, capsys):
    assert main(["sim", "init", "--out", str(tmp_path / "sim")]) == 0
    assert main(["sim", "init", "--out", str(tmp_path / "sim")]) == 2
