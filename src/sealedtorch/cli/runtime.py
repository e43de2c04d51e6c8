"""``sealedtorch serve`` and ``sealedtorch client infer``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..atomicfile import write_atomically
from ..errors import ConfigError
from .common import (
    TEE_CHOICES,
    add_command,
    add_noun,
    add_output_option,
    add_trust_sim_root,
    check_https_url,
    default_keycache_socket,
    required_output,
)

#: ``serve``'s default address: not the keyserver's 8443, so both run on one host as-is.
DEFAULT_LISTEN = "127.0.0.1:9443"


def register(sub: argparse._SubParsersAction) -> None:
    _add_serve(sub)
    csub = add_noun(sub, "client", help="talk to a sealedtorch runtime", dest="client_command")
    _add_client_infer(csub)
    _add_client_cert(csub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "serve", _serve, help="serve sealed models (KServe v2 REST over TLS, attested)",
        description="Load sealed models with keys from the keycache, decrypting them only in "
                    "this process, and serve them over the Open Inference Protocol (KServe "
                    "v2) REST API with TLS.  GET /v1/attestation?nonce=... returns evidence "
                    "bound to the TLS key.  Exits with status 2 if a model fails to load.")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a sealed model to serve as NAME (repeatable)")
    p.add_argument("--arch", action="append", default=[], metavar="[NAME=]ARCH",
                   help="architecture for model NAME (or for every model) instead of the one "
                        "in the sealed metadata; must be on the allow-list")
    p.add_argument("--keycache", metavar="SOCKET", default=default_keycache_socket(),
                   help="the keycache's Unix socket, where the keys come from "
                        "($SEALEDTORCH_KEYCACHE_SOCKET; default %(default)s)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="address to serve on (port 0: any free port; default %(default)s; "
                        "the keyserver's default is 8443)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); default: a fresh "
                   "self-signed certificate whose key never leaves memory")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="overrides the configuration's device (part of the measurement)")
    p.add_argument("--config", type=Path, help="runtime configuration (YAML/JSON): "
                   "architecture allow-list, limits, device; part of the measurement")
    p.add_argument("--tee", default="auto", choices=TEE_CHOICES,
                   help="which TEE produces this runtime's evidence (default: detect)")
    p.add_argument("--sim-platform", type=Path,
                   help="sim TEE platform directory (or $SEALEDTORCH_SIM_PLATFORM)")
    p.add_argument("--pccs-url", help="SGX/TDX collateral source for verifying the "
                   "keycache's evidence (which keycache is trusted is the configuration's "
                   "`keycache` rules, not this)")
    p.add_argument("--kds-url", help="SEV-SNP VCEK source for verifying the keycache's "
                   "evidence")
    p.add_argument("--cache-dir", type=Path, help="collateral / VCEK cache for verifying "
                   "the keycache's evidence")
    p.add_argument("--stay-unready", action="store_true",
                   help="if a model fails to load, keep serving (live, not ready) instead of "
                        "exiting")
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--write-cert", type=Path, metavar="PATH",
                   help="write the serving TLS certificate (and, if generated, its "
                        "throwaway CA) to PATH at start, for clients that need a CA file; "
                        "pin it only after checking its key against /v1/attestation")
    p.add_argument("--announce", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true",
                   help="print the canonical runtime configuration (what is measured), exit")
    p.add_argument("--print-measurement", action="store_true",
                   help="print the sim measurement of this runtime and configuration, exit")


def _add_client_infer(csub: argparse._SubParsersAction) -> None:
    p = add_command(
        csub, "infer", _client_infer,
        help="attest the runtime, pin its TLS key, then run inference",
        description="Fetch the runtime's evidence for a fresh nonce, verify it and check that "
                    "it binds the TLS key of the connection, apply the policy, and only then "
                    "send the input, over connections pinned to that key.  Exit 1 if the "
                    "policy denies (nothing is sent), 2 on any other error.")
    _add_attested_runtime_options(p, sim_roots=False)
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--input", type=Path, required=True,
                   help=".npy (one input), .npz (named inputs), .pt (tensor or dict) or "
                        ".json ({name: nested list} or a KServe request body)")
    add_trust_sim_root(p)
    p.add_argument("--output", type=Path, help="write outputs to .npz/.npy/.json")
    p.add_argument("--json-wire", action="store_true",
                   help="send tensors as JSON instead of the binary extension")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="per-request timeout in seconds")
    p.add_argument("--allow-file-tls-key", action="store_true",
                   help="accept a runtime whose TLS key was loaded from a file (serve "
                        "--tls-key): the host may hold that key; refused by default")
    p.add_argument("--expect-model", action="append", default=[],
                   metavar="NAME=MODEL_ID[@MIN_KEY_VERSION]",
                   help="refuse (exit 2, nothing sent) unless the attested runtime serves "
                        "MODEL_ID, at least key version MIN_KEY_VERSION, as NAME "
                        "(repeatable)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="NAME=SHA256",
                   help="refuse unless the attested runtime serves NAME from the sealed file "
                        "with this SHA-256 (sha256sum of the .sealed file; repeatable)")


def _add_client_cert(csub: argparse._SubParsersAction) -> None:
    p = add_command(
        csub, "cert", _client_cert,
        help="attest the runtime, then write its TLS certificate for other clients",
        description="Fetch the runtime's evidence for a fresh nonce, verify it, check that "
                    "it binds the TLS key of the connection and apply the policy; only then "
                    "write the certificate that connection presented (PEM) to --output, for "
                    "clients that pin a certificate file (curl --cacert; in Python "
                    "sealedtorch.runtime.client.pinned_ssl_context).  Exit 1 if the policy "
                    "denies (nothing is written), 2 on any other error.")
    _add_attested_runtime_options(p, sim_roots=True)
    add_output_option(p, metavar="PATH",
                      help="where to write the attested certificate (PEM; required)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")


def _add_attested_runtime_options(p: argparse.ArgumentParser, *, sim_roots: bool) -> None:
    """Which runtime a client command attests, and what it must satisfy."""
    p.add_argument("--url", required=True, help="https://HOST:PORT of the runtime")
    p.add_argument("--policy", type=Path, required=True,
                   help="reference values the runtime must satisfy (policy YAML/JSON)")
    if sim_roots:
        add_trust_sim_root(p)


def _split_arch(values: list[str], names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, arch = value.partition("=")
        if not sep:
            for n in names:
                out.setdefault(n, value)
            continue
        if name not in names:
            raise ConfigError(f"--arch {value!r}: no --model named {name!r}")
        out[name] = arch
    return out


def _serve(args: argparse.Namespace) -> int:
    from ..runtime.config import load_config, runtime_measurement
    from ..runtime.loader import parse_model_arg

    config = load_config(args.config).with_overrides(device=args.device)
    if args.print_config or args.print_measurement:
        if args.print_config:
            sys.stdout.write(config.canonical_bytes().decode())
        if args.print_measurement:
            print(runtime_measurement(config).hex())
        return 0
    if not args.model:
        raise ConfigError("serve needs at least one --model NAME=PATH.sealed")
    names = [m.partition("=")[0] for m in args.model]
    arches = _split_arch(args.arch, names)
    sources = [parse_model_arg(m, arches.get(n)) for m, n in zip(args.model, names, strict=True)]
    if not args.keycache:
        raise ConfigError("serve needs --keycache SOCKET: sealed models are opened only with "
                          "keys from the keycache")
    from ..attest import VerifierConfig
    from ..keycache import KeycacheClient
    from ..runtime.server import serve

    collateral = VerifierConfig(pccs_url=args.pccs_url, kds_url=args.kds_url,
                                cache_dir=args.cache_dir)
    keys = KeycacheClient(args.keycache, tee=args.tee, sim_platform=args.sim_platform,
                          runtime_config=config.canonical_bytes(),
                          keycache_rules=config.keycache, verifier=collateral)
    try:
        return serve(sources, keys=keys, config=config, listen=args.listen,
                     tls_cert=args.tls_cert, tls_key=args.tls_key, tee=args.tee,
                     sim_platform=args.sim_platform, announce=args.announce,
                     exit_on_load_failure=not args.stay_unready, log_format=args.log_format,
                     write_cert=args.write_cert)
    finally:
        keys.close()


def read_input_file(path: Path) -> Any:
    """Inputs from a file: one tensor, or a mapping of name -> tensor/array."""
    import numpy as np
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor) or (
                    isinstance(obj, dict) and all(isinstance(v, torch.Tensor)
                                                  for v in obj.values())):
                return obj
            raise ConfigError(f"{path}: expected a tensor or a dict of tensors")
        if suffix == ".json":
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
                return {i["name"]: np.asarray(i["data"]).reshape(i["shape"])
                        for i in doc["inputs"]}
            if isinstance(doc, dict):
                return {k: np.asarray(v) for k, v in doc.items()}
            return np.asarray(doc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read input file {path}: {exc}") from None
    raise ConfigError(f"{path}: unknown input format {suffix!r} (use .npy, .npz, .pt, .json)")


def _write_outputs(path: Path, outputs: dict[str, Any]) -> None:
    import numpy as np

    arrays = {k: v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy()
              for k, v in outputs.items()}
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, **arrays)
    elif suffix == ".npy":
        if len(arrays) != 1:
            raise ConfigError(f"{path}: the model has {len(arrays)} outputs; use .npz")
        np.save(path, next(iter(arrays.values())))
    elif suffix == ".json":
        from ..runtime.kserve import datatype_of

        path.write_text(json.dumps({k: {"datatype": datatype_of(outputs[k].dtype),
                                        "shape": list(a.shape), "data": a.tolist()}
                                    for k, a in arrays.items()}))
    else:
        raise ConfigError(f"{path}: unknown output format (use .npz, .npy or .json)")


def _client_infer(args: argparse.Namespace) -> int:
    from ..runtime.client import AttestedClient, parse_expectations

    check_https_url(args.url, "--url")
    expect = parse_expectations(args.expect_model, args.expect_digest)
    inputs = read_input_file(args.input)
    with AttestedClient(args.url, policy=args.policy, sim_roots=args.sim_root,
                        timeout=args.timeout, allow_file_tls_key=args.allow_file_tls_key,
                        expect=expect) as client:
        result = client.attest()
        print(f"attested: {result.claims.tee} runtime at {args.url}; "
              f"{result.decision.reasons[0]}; TLS key pinned "
              f"(sha256 {_sha256(result.spki)[:16]}...)", file=sys.stderr)
        outputs = client.infer(args.model, inputs, binary=not args.json_wire)
    if args.output is not None:
        _write_outputs(args.output, outputs)
    print(json.dumps(output_summary(args.model, outputs)))
    return 0


def _client_cert(args: argparse.Namespace) -> int:
    import ssl

    from ..runtime.client import AttestedClient

    out = required_output(args, "client cert needs --output FILE (where to write the "
                                "certificate)")
    check_https_url(args.url, "--url")
    with AttestedClient(args.url, policy=args.policy, sim_roots=args.sim_root,
                        timeout=args.timeout) as client:
        result = client.attest()
        der = client.certificate_der
    assert der is not None
    try:
        write_atomically(out, ssl.DER_cert_to_PEM_cert(der).encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {out}: {exc.strerror}") from None
    print(f"attested: {result.claims.tee} runtime at {args.url}; "
          f"{result.decision.reasons[0]}; wrote its TLS certificate to {args.out}",
          file=sys.stderr)
    print(json.dumps({"url": args.url, "path": str(args.out),
                      "tls_spki_sha256": _sha256(result.spki)}))
    return 0


#: How many values of each output ``client infer`` prints (all of them go to --output).
SUMMARY_VALUES = 64


def output_summary(model: str, outputs: dict[str, Any]) -> dict[str, Any]:
    """What ``client infer`` prints: the KServe response layout (``outputs``: a list of
    name, KServe ``datatype``, shape, ``data``), the same keys for every size, so a script
    parses one shape: ``data`` holds the first :data:`SUMMARY_VALUES` values in row-major
    order, ``elements`` the total count and ``truncated`` whether some were left out."""
    import torch

    from ..runtime.kserve import datatype_of

    entries = []
    for name, t in outputs.items():
        flat = t.reshape(-1)
        head = flat[:SUMMARY_VALUES]
        if head.dtype in (torch.float16, torch.bfloat16):
            head = head.float()
        entries.append({"name": name, "datatype": datatype_of(t.dtype), "shape": list(t.shape),
                        "data": head.tolist(), "elements": flat.numel(),
                        "truncated": flat.numel() > SUMMARY_VALUES})
    return {"model": model, "outputs": entries}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
