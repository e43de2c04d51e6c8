"""``sealedtorch seal | unseal | inspect | demo``: the owner's file tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seal", help="encrypt a state_dict into a .sealed file",
                       description="Encrypt a torch.save'd state_dict (.pt/.pth, loaded with "
                                   "weights_only=True) or a .safetensors file.")
    p.add_argument("input", type=Path, help="plaintext weights: .pt, .pth or .safetensors")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .sealed file to write")
    p.add_argument("--model-id", required=True, help="model id recorded in the file preamble")
    keyg = p.add_mutually_exclusive_group(required=True)
    keyg.add_argument("--key", type=Path, help="existing key file to seal with")
    keyg.add_argument("--key-out", type=Path,
                      help="generate a fresh 256-bit key and write it here (mode 0600)")
    p.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="string metadata stored in the encrypted header (repeatable)")
    p.add_argument("--metadata-json", action="append", default=[], metavar="K=JSON",
                   help="JSON-valued metadata, e.g. arch_kwargs='{\"num_classes\": 10}'")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per chunk (1 MiB)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    reg = p.add_argument_group("register the key with a keyserver in the same step")
    reg.add_argument("--register", metavar="URL", help="keyserver URL (https://host:port)")
    reg.add_argument("--ca", type=Path, help="the keyserver's CA certificate")
    reg.add_argument("--token-file", type=Path, help="admin/owner token file")
    reg.add_argument("--policy", type=Path, help="policy file for this model's key")
    p.set_defaults(handler=_seal)

    p = sub.add_parser("unseal", help="decrypt a .sealed file to .safetensors (owner only)")
    p.add_argument("input", type=Path)
    p.add_argument("--key", type=Path, required=True, help="key file")
    p.add_argument("-o", "--output", type=Path, required=True, help=".safetensors to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_unseal)

    p = sub.add_parser("inspect", help="show a sealed file's preamble (and tensors with a key)")
    p.add_argument("input", type=Path)
    p.add_argument("--key", type=Path, help="key file: also decrypt and list the tensor table")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser(
        "demo", help="end-to-end confidential ResNet-50: keyserver, keycache, runtime, client",
        description="Seal a ResNet-50, run a keyserver, a keycache and `sealedtorch serve` on "
                    "127.0.0.1 in the sim TEE (a software stand-in: insecure), classify a "
                    "bundled image through `sealedtorch client infer`, check the logits are "
                    "bit-identical to the plaintext model's, show that a runtime with a "
                    "modified measurement is refused its key, and stop everything.")
    p.add_argument("--workdir", type=Path,
                   help="keep files and process logs here (default: a temp dir, removed)")
    p.add_argument("--pretrained", action="store_true",
                   help="torchvision's pretrained weights (needs a download) instead of "
                        "seeded random weights")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds (default 10)")
    p.set_defaults(handler=_demo)


def _parse_metadata(pairs: list[str], json_pairs: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in pairs:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"--metadata expects KEY=VALUE, got {item!r}")
        meta[k] = v
    for item in json_pairs:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"--metadata-json expects KEY=JSON, got {item!r}")
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--metadata-json {k}: invalid JSON ({exc})") from None
    return meta


def _seal(args: argparse.Namespace) -> int:
    from .format import load_plain, seal
    from .keys import ModelKey, read_key_file, write_key_file

    metadata = _parse_metadata(args.metadata, args.metadata_json)
    policy = None
    if args.register:
        from .attest.policy import load_policy

        if not (args.token_file and args.policy):
            raise ConfigError("--register needs --token-file and --policy (and --ca for a "
                              "private CA)")
        policy = load_policy(args.policy)  # validate before any work is done
    state, file_meta = load_plain(args.input)
    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output}: already exists (use --force to replace)")
    created_key: Path | None = None
    if args.key:
        key = read_key_file(args.key)
        if key.model_id != args.model_id:
            raise ConfigError(f"{args.key} is a key for model {key.model_id!r}, "
                              f"not {args.model_id!r}")
    else:
        key = ModelKey.generate(args.model_id)
        created_key = write_key_file(args.key_out, key)
    try:
        sealed = seal(state, args.output, key=key, metadata={**file_meta, **metadata},
                      chunk_size=args.chunk_size, overwrite=args.force,
                      progress=False if args.quiet else None)
    except BaseException:
        if created_key is not None:  # the key protects nothing that exists
            created_key.unlink(missing_ok=True)
        raise
    r = sealed.result
    print(f"sealed {r.tensor_count} tensors ({r.data_length / 1e6:.1f} MB) of model "
          f"{r.model_id!r} key version {r.key_version} -> {r.path} ({r.file_size} bytes)")
    if created_key is not None:
        print(f"new model key written to {created_key} (mode 0600): keep it secret and do "
              "not lose it")
    if args.register:
        from .keyserver.client import register_key

        assert policy is not None
        register_key(args.register, args.ca, args.token_file, key, policy)
        print(f"registered model {key.model_id!r} version {key.version} with {args.register} "
              f"(policy {policy.digest()[:16]})")
    return 0


def _unseal(args: argparse.Namespace) -> int:
    from .format import unseal

    out = unseal(args.input, key=args.key, out=args.output, overwrite=args.force,
                 progress=False if args.quiet else None)
    print(f"decrypted {args.input} -> {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .format import inspect_file

    info = inspect_file(args.input, key=args.key)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    pre = info["preamble"]
    print(f"{info['path']}: sealedtorch format v{pre['format_version']}, {pre['cipher']}")
    for k in ("model_id", "key_version", "chunk_size", "chunk_count", "data_length",
              "file_size"):
        print(f"  {k:<12} {pre[k]}")
    if "tensors" in info:
        print(f"  metadata     {json.dumps(info['metadata'])}")
        print(f"  tensors      {len(info['tensors'])}")
        for t in info["tensors"]:
            if "alias_of" in t:
                print(f"    {t['name']:<48} = {t['alias_of']} (tied)")
            else:
                shape = "x".join(map(str, t["shape"])) or "scalar"
                print(f"    {t['name']:<48} {t['dtype']:<10} {shape:<20} {t['nbytes']:>12}")
    else:
        print("  (pass --key to decrypt the header and list tensors)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
