"""``sealedtorch attest verify | measure | fetch-key`` and ``sealedtorch sim init`` (the
software TEE that ``--tee sim`` evidence comes from)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import (
    TEE_CHOICES,
    add_command,
    add_json_flag,
    add_keyserver_options,
    add_noun,
    add_output_option,
    add_trust_sim_root,
    check_https_url,
    check_model_id,
    read_bytes_or_empty,
    refuse_existing_key_file,
    require,
    required_output,
)


def register(sub: argparse._SubParsersAction) -> None:
    asub = add_noun(sub, "attest", help="verify attestation evidence, measure, fetch keys",
                    dest="attest_command")
    _add_verify(asub)
    _add_measure(asub)
    _add_fetch_key(asub)

    ssub = add_noun(sub, "sim", help="the software TEE for development (insecure)",
                    dest="sim_command")
    p = add_command(ssub, "init", _sim_init, help="create a sim platform key pair",
                    description="Create a sim platform (Ed25519 key pair). Relying "
                                "parties must explicitly trust its platform.pub.")
    add_output_option(p, metavar="DIR", help="directory to create (required)")


def _add_verify(asub: argparse._SubParsersAction) -> None:
    p = add_command(asub, "verify", _verify,
                    help="verify SGX/TDX/SNP/sim evidence and print its claims",
                    description="Verify evidence; exit 0 only if it verifies (and the "
                                "policy, if given, allows it); 1 if the policy denies; "
                                "2 if the evidence does not verify.")
    p.add_argument("--tee", required=True, choices=["sgx", "tdx", "snp", "sim"])
    p.add_argument("--evidence", type=Path, required=True,
                   help="quote (sgx/tdx), report (snp) or sim statement")
    p.add_argument("--collateral", type=Path, help="dcap-qvl collateral JSON (sgx/tdx)")
    p.add_argument("--pccs-url", help="fetch SGX/TDX collateral from this PCCS when not given")
    p.add_argument("--vcek", type=Path, help="SNP: VCEK/VLEK certificate (DER or PEM)")
    p.add_argument("--chain", type=Path, help="SNP: ASK+ARK PEM chain (default: shipped roots)")
    p.add_argument("--kds-url", help="SNP: fetch the VCEK from this AMD KDS when not given")
    p.add_argument("--cache-dir", type=Path, help="cache for fetched collateral / VCEKs")
    add_trust_sim_root(p)
    p.add_argument("--at", type=float, metavar="UNIX_TIME",
                   help="verify as of this Unix time in seconds (default: now)")
    p.add_argument("--policy", type=Path, help="also decide against this policy's allow rules")
    add_json_flag(p, help="machine-readable output")


def _add_measure(asub: argparse._SubParsersAction) -> None:
    p = add_command(
        asub, "measure", _measure, help="print the sim measurement of this installation",
        description="With --config: the runtime's measurement for that runtime "
                    "configuration, the same value as 'sealedtorch serve --config FILE "
                    "--print-measurement' (what a policy's 'allow' rules pin).  Without "
                    "options (or with --raw-config FILE): the keycache's measurement when it "
                    "runs without (or with that) --runtime-config (what 'holders' rules pin).")
    p.add_argument("--config", type=Path,
                   help="runtime configuration file (YAML/JSON), measured in its canonical "
                        "form exactly as 'serve --config' measures it")
    p.add_argument("--raw-config", type=Path, metavar="FILE",
                   help="measure FILE's bytes as they are (what 'keycache --runtime-config' "
                        "does)")
    add_json_flag(p)


def _add_fetch_key(asub: argparse._SubParsersAction) -> None:
    p = add_command(
        asub, "fetch-key", _fetch_key,
        help="attest to a keyserver and fetch one model key (diagnostic)",
        description="Challenge, evidence, attest, fetch and HPKE-open one model key, as a "
                    "runtime would, and write it to a key file (mode 0600).")
    add_keyserver_options(p, token=False)
    p.add_argument("--tee", default="auto", choices=TEE_CHOICES)
    p.add_argument("--sim-platform", type=Path, metavar="DIR",
                   help="sim platform directory (or $SEALEDTORCH_SIM_PLATFORM)")
    p.add_argument("--runtime-config", type=Path,
                   help="sim: configuration file included in the measurement")
    p.add_argument("--role", choices=["runtime", "holder"], default="runtime",
                   help="runtime: uses keys itself; holder: holds them for local runtimes "
                        "(the keycache)")
    p.add_argument("--model-id", required=True)
    p.add_argument("--version", type=int, help="key version (default: latest active)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="KEYFILE")


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def _verify(args: argparse.Namespace) -> int:
    from ..attest import Evidence, Tee, VerifierConfig, verify
    from ..attest.policy import load_policy
    from ..attest.sim import load_platform_keys

    policy = load_policy(args.policy) if args.policy else None
    certificates = None
    if args.vcek or args.chain:
        certificates = (_read(args.vcek) or b"") + (_read(args.chain) or b"")
    sim_keys = load_platform_keys(args.sim_root)
    evidence = Evidence(Tee(args.tee), _read(args.evidence) or b"",
                        collateral=_read(args.collateral), certificates=certificates)
    config = VerifierConfig(sim_platform_keys=sim_keys, pccs_url=args.pccs_url,
                            kds_url=args.kds_url, cache_dir=args.cache_dir)
    claims = verify(evidence, at=args.at, config=config)
    decision = policy.decide_use(claims) if policy else None
    if args.json:
        out: dict[str, object] = {"verified": True, "claims": claims.to_json()}
        if decision is not None and policy is not None:
            out["policy"] = {"digest": policy.digest(), "allowed": decision.allowed,
                             "reasons": list(decision.reasons)}
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        label = ", INSECURE software TEE" if claims.insecure else ""
        print(f"evidence verified ({args.tee}{label})")
        for k, v in claims.to_json().items():
            print(f"  {k:<18} {v}")
        if decision is not None:
            print(f"policy: {'ALLOWED' if decision.allowed else 'DENIED'}")
            for r in decision.reasons:
                print(f"  - {r}")
    return 0 if decision is None or decision.allowed else 1


def _measure(args: argparse.Namespace) -> int:
    from ..attest.measure import measurement

    if args.config is not None and args.raw_config is not None:
        raise ConfigError("give --config (a runtime configuration) or --raw-config, not both")
    if args.config is not None:
        from ..runtime.config import load_config, runtime_measurement

        value = runtime_measurement(load_config(args.config)).hex()
    else:
        value = measurement(_read(args.raw_config) or b"").hex()
    if args.json:
        print(json.dumps({"tee": "sim", "measurement": value}))
    else:
        print(value)
    return 0


def _sim_init(args: argparse.Namespace) -> int:
    from ..attest.sim import init_platform

    out = required_output(args, "sim init needs --output DIR (the directory to create)")
    platform = init_platform(out)
    print(f"sim platform created in {out}: platform.key (0600, keep private), "
          f"platform.pub (give to relying parties: --trust-sim-root FILE)")
    print(f"public key: {platform.public_key.hex()}")
    print("WARNING: the sim TEE is a software stand-in; it proves nothing about hardware.")
    return 0


def _fetch_key(args: argparse.Namespace) -> int:
    from ..attest.attesters import get_attester
    from ..keys import write_key_file
    from ..keyserver.client import AttestedKeyClient

    check_model_id(args.model_id)
    require(args, "keyserver")
    check_https_url(args.keyserver, "--keyserver")
    refuse_existing_key_file(args.output)
    config = read_bytes_or_empty(args.runtime_config)
    attester = get_attester(args.tee, sim_platform=args.sim_platform, runtime_config=config)
    with AttestedKeyClient(args.keyserver, args.ca, attester, role=args.role) as client:
        result = client.attest()
        released = client.fetch(args.model_id, args.version)
    write_key_file(args.output, released.model_key)
    note = " (INSECURE sim evidence)" if result.insecure else ""
    print(f"fetched {released.model_key.model_id} version {released.model_key.version} as "
          f"{args.role}{note}; policy {released.policy_digest[:16]}…; key written to "
          f"{args.output}")
    return 0
