"""``sealedtorch seal | unseal | inspect | demo``: the owner's file tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, KeyFileError, SealedTorchError
from .common import (
    add_command,
    add_json_flag,
    check_https_url,
    check_model_id,
    check_output_dir,
    parse_metadata,
    print_json,
    refuse_existing_output,
)

if TYPE_CHECKING:
    from ..attest.policy import Policy
    from ..keys import ModelKey


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "seal", _seal, help="encrypt a state_dict into a .sealed file",
                    description="Encrypt a torch.save'd state_dict (.pt/.pth, loaded with "
                                "weights_only=True) or a .safetensors file.")
    p.add_argument("input", type=Path, help="plaintext weights: .pt, .pth or .safetensors")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .sealed file to write")
    p.add_argument("--model-id", required=True, help="model id recorded in the file preamble")
    keyg = p.add_mutually_exclusive_group(required=True)
    keyg.add_argument("--key", type=Path, help="existing key file to seal with")
    keyg.add_argument("--key-out", type=Path,
                      help="generate a fresh 256-bit key and write it here (mode 0600)")
    p.add_argument("--key-version", type=int, default=1, metavar="N",
                   help="with --key-out: the new key's version (for `keys rotate --key`, "
                        "one above the keyserver's latest)")
    p.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="string metadata stored in the encrypted header (repeatable)")
    p.add_argument("--metadata-json", action="append", default=[], metavar="K=JSON",
                   help="JSON-valued metadata, e.g. arch_kwargs='{\"num_classes\": 10}'")
    p.add_argument("--chunk-size", type=int, default=1 << 20, metavar="BYTES",
                   help="bytes per chunk, a multiple of 64")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_json_flag(p, help="print the result as one JSON object on stdout (implies --quiet)")
    reg = p.add_argument_group("register the key with a keyserver in the same step")
    reg.add_argument("--register", metavar="URL", help="keyserver URL (https://host:port)")
    reg.add_argument("--ca", type=Path, metavar="FILE",
                     help="the keyserver's CA certificate (its DATA/tls/ca.pem)")
    reg.add_argument("--token-file", type=Path, metavar="FILE",
                     help="admin/owner token file")
    reg.add_argument("--policy", type=Path, metavar="FILE",
                     help="policy file for this model's key (needs --register)")

    p = add_command(sub, "unseal", _unseal,
                    help="decrypt a .sealed file to .safetensors (owner only)",
                    description="Decrypt a .sealed file with its key file and write the "
                                "tensors and metadata to a .safetensors file (written "
                                "atomically; nothing is written if any check fails).")
    p.add_argument("input", type=Path, help="the .sealed file")
    p.add_argument("--key", type=Path, required=True, help="key file")
    p.add_argument("-o", "--output", type=Path, required=True, help=".safetensors to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add_command(sub, "inspect", _inspect,
                    help="show a sealed file's preamble (and tensors with a key)",
                    description="Print the public preamble of a .sealed file (model id, "
                                "key version, sizes) after checking the file's length; "
                                "with --key also decrypt the header and list the tensors. "
                                "Exit 2 if the file is truncated or not a sealed file.")
    p.add_argument("input", type=Path, help="the .sealed file")
    p.add_argument("--key", type=Path, help="key file: also decrypt and list the tensor table")
    add_json_flag(p, help="print one JSON object on stdout")

    p = add_command(
        sub, "demo", _demo,
        help="end-to-end confidential ResNet-50: keyserver, keycache, runtime, client",
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
    p.add_argument("--rounds", type=int, default=10, help="timing rounds")


def _seal(args: argparse.Namespace) -> int:
    from ..format import load_plain, seal
    from ..format.writer import remove_stale_temp_files

    metadata, policy = _check_seal_args(args)
    quiet = args.quiet or args.json
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    for path, size in remove_stale_temp_files(args.output):
        say(f"removed {path} ({size} bytes), a temporary file left by an interrupted seal")
    state, file_meta = load_plain(args.input)
    key, created_key = _seal_key(args)
    try:
        sealed = seal(state, args.output, key=key, metadata={**file_meta, **metadata},
                      chunk_size=args.chunk_size, overwrite=args.force,
                      progress=False if quiet else None)
    except BaseException:
        if created_key is not None:  # the key protects nothing that exists
            created_key.unlink(missing_ok=True)
        raise
    r = sealed
    result: dict[str, Any] = {
        "output": str(r.path), "model_id": r.model_id, "key_version": r.key_version,
        "tensor_count": r.tensor_count, "data_length": r.data_length,
        "file_size": r.file_size, "key_file": str(created_key or args.key),
        "key_created": created_key is not None, "registered": None}
    if not args.json:
        print(f"sealed {r.tensor_count} tensors ({r.data_length / 1e6:.1f} MB) of model "
              f"{r.model_id!r} key version {r.key_version} -> {r.path} ({r.file_size} bytes)")
        if created_key is not None:
            print(f"new model key written to {created_key} (mode 0600): keep it secret and "
                  "do not lose it")
    if args.register:
        assert policy is not None
        result["registered"] = _register_sealed_key(args, key, policy, r.path,
                                                    created_key or args.key)
    if args.json:
        print(json.dumps(result))
    return 0


def _check_seal_args(args: argparse.Namespace) -> tuple[dict[str, Any], Policy | None]:
    """Every check ``seal`` can make before reading the weights: nothing is written (no
    key file either) when one fails.  Returns the parsed metadata and, with
    ``--register``, the loaded policy."""
    check_model_id(args.model_id)
    metadata = parse_metadata(args.metadata, args.metadata_json)
    policy: Policy | None = None
    if args.policy is not None and not args.register:
        raise ConfigError("--policy is only used with --register URL (the policy goes to the "
                          "keyserver with the key); add --register, or register later with "
                          "`sealedtorch keys register`")
    if args.register:
        from ..attest.policy import load_policy

        if not (args.token_file and args.policy):
            raise ConfigError("--register needs --token-file and --policy (and --ca for a "
                              "private CA)")
        check_https_url(args.register, "--register")
        policy = load_policy(args.policy)  # validate before any work is done
    if args.key is not None and args.key_version != 1:
        raise ConfigError("--key-version is for a new key (--key-out); a --key file already "
                          "has its version")
    check_output_dir(args.output, "--output")
    if args.key_out is not None:
        check_output_dir(args.key_out, "--key-out")
    refuse_existing_output(args.output, args.force)
    if args.key_out is not None and args.key_out.exists():
        raise KeyFileError(
            f"{args.key_out}: already exists; refusing to overwrite a key file. If an "
            f"earlier seal was interrupted, seal again with --key {args.key_out} to reuse "
            "that key (or remove the file)")
    return metadata, policy


def _seal_key(args: argparse.Namespace) -> tuple[ModelKey, Path | None]:
    """The key to seal with (``--key``), or a new one written to ``--key-out``; the
    second value is the key file created (None with ``--key``)."""
    from ..keys import ModelKey, read_key_file, write_key_file

    if args.key:
        key = read_key_file(args.key)
        if key.model_id != args.model_id:
            raise ConfigError(f"{args.key} is a key for model {key.model_id!r}, "
                              f"not {args.model_id!r}")
        return key, None
    try:
        key = ModelKey.generate(args.model_id, args.key_version)
    except ValueError as exc:
        raise ConfigError(f"--key-version: {exc}") from None
    return key, write_key_file(args.key_out, key)


def _register_sealed_key(args: argparse.Namespace, key: ModelKey, policy: Policy,
                         sealed_path: Path, key_file: Path) -> dict[str, Any]:
    """``seal --register``: the key goes to the keyserver.  If that fails, the error (same
    class, so the same exit status) also says what was written and how to register later."""
    from ..keyserver.client import register_key

    try:
        register_key(args.register, args.ca, args.token_file, key, policy)
    except SealedTorchError as exc:
        later = (f"sealedtorch keys register --keyserver {args.register} --model-id "
                 f"{key.model_id} --key {key_file} --policy {args.policy}"
                 + (f" --ca {args.ca}" if args.ca else "")
                 + f" --token-file {args.token_file}")
        # same error class (same exit status), one line that also says what exists
        exc.args = (f"{exc}. The sealed file {sealed_path} and the key file "
                    f"{key_file} were written, but the key is NOT "
                    f"registered; register it later with: {later}",)
        raise
    if not args.json:
        print(f"registered model {key.model_id!r} version {key.version} with "
              f"{args.register} (policy {policy.digest()[:16]})")
    return {"keyserver": args.register, "policy_digest": policy.digest()}


def _unseal(args: argparse.Namespace) -> int:
    from ..format import unseal

    out = unseal(args.input, key=args.key, out=args.output, overwrite=args.force,
                 progress=False if args.quiet else None)
    print(f"decrypted {args.input} -> {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..format import inspect_file

    info = inspect_file(args.input, key=args.key)
    if args.json:
        print_json(info)
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
    from ..demo import run_demo

    return run_demo(args)
