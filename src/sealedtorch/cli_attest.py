"""``sealedtorch attest verify | measure`` and ``sealedtorch sim init``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import hidden_alias
from .errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    attest = sub.add_parser("attest", help="verify attestation evidence, measure, fetch keys")
    asub = attest.add_subparsers(dest="attest_command", metavar="COMMAND", required=True)

    p = asub.add_parser("verify", help="verify SGX/TDX/SNP/sim evidence and print its claims",
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
    p.add_argument("--trust-sim-root", dest="sim_root", type=Path, action="append",
                   default=[], metavar="FILE",
                   help="sim: trust this sim platform's platform.pub (INSECURE, development "
                        "only; repeatable)")
    hidden_alias(p, "--sim-root", dest="sim_root", type=Path, action="append")
    p.add_argument("--at", type=float, metavar="UNIX_TIME",
                   help="verify as of this Unix time in seconds (default: now)")
    p.add_argument("--policy", type=Path, help="also decide against this policy's allow rules")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_verify)

    p = asub.add_parser(
        "measure", help="print the sim measurement of this installation",
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_measure)

    try:
        from .cli_keyserver import add_fetch_key_parser
    except ImportError:  # the keyserver client is optional for the attest tools
        pass
    else:
        add_fetch_key_parser(asub)

    sim = sub.add_parser("sim", help="the software TEE for development (insecure)")
    ssub = sim.add_subparsers(dest="sim_command", metavar="COMMAND", required=True)
    p = ssub.add_parser("init", help="create a sim platform key pair",
                        description="Create a sim platform (Ed25519 key pair). Relying "
                                    "parties must explicitly trust its platform.pub.")
    p.add_argument("-o", "--output", dest="out", type=Path, metavar="DIR",
                   help="directory to create (required)")
    hidden_alias(p, "--out", dest="out", type=Path)
    p.set_defaults(handler=_sim_init)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def _verify(args: argparse.Namespace) -> int:
    from .attest import Evidence, Tee, VerifierConfig, verify
    from .attest.policy import load_policy
    from .attest.sim import load_platform_keys

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
    from .attest.measure import measurement

    if args.config is not None and args.raw_config is not None:
        raise ConfigError("give --config (a runtime configuration) or --raw-config, not both")
    if args.config is not None:
        from .runtime.config import load_config, runtime_measurement

        value = runtime_measurement(load_config(args.config)).hex()
    else:
        value = measurement(_read(args.raw_config) or b"").hex()
    if args.json:
        print(json.dumps({"tee": "sim", "measurement": value}))
    else:
        print(value)
    return 0


def _sim_init(args: argparse.Namespace) -> int:
    from .attest.sim import init_platform

    if args.out is None:  # not required= in argparse: the hidden old --out satisfies it too
        raise ConfigError("sim init needs --output DIR (the directory to create)")
    platform = init_platform(args.out)
    print(f"sim platform created in {args.out}: platform.key (0600, keep private), "
          f"platform.pub (give to relying parties: --trust-sim-root FILE)")
    print(f"public key: {platform.public_key.hex()}")
    print("WARNING: the sim TEE is a software stand-in; it proves nothing about hardware.")
    return 0
