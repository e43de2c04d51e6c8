"""``sealedtorch manifest keygen | sign``: the owner vouches for sealed files (thin wrappers
over :mod:`sealedtorch.runtime.manifest`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command, add_noun, add_output_option, required_output


def register(sub: argparse._SubParsersAction) -> None:
    msub = add_noun(sub, "manifest", help="owner-signed manifests of sealed files",
                    dest="manifest_command")
    p = add_command(msub, "keygen", _keygen, help="create an owner manifest-signing key (0600)",
                    description="Write a new Ed25519 signing key (PEM, mode 0600, never "
                                "overwritten) and print its public key (hex), the value "
                                "for models.NAME.manifest_keys in a runtime "
                                "configuration.")
    add_output_option(p, metavar="FILE",
                      help="where to write the new signing key (PEM, mode 0600; required)")
    p = add_command(msub, "sign", _sign,
                    help="sign FILE.sealed's manifest (FILE.sealed.manifest)",
                    description="Write FILE.sealed.manifest: model id and key version from "
                                "the preamble, the file's SHA-256, signed with the owner "
                                "key.  Prints the digest.")
    p.add_argument("sealed", type=Path, metavar="FILE.sealed", help="the sealed file to vouch for")
    p.add_argument("--signing-key", type=Path, required=True, metavar="FILE",
                   help="the owner's signing key (from `manifest keygen`)")
    p.add_argument("--force", action="store_true", help="replace an existing manifest")


def _keygen(args: argparse.Namespace) -> int:
    from ..runtime.manifest import generate_signing_key

    out = required_output(args, "manifest keygen needs --output FILE (the signing key to "
                                "create)")
    print(generate_signing_key(out).public_bytes.hex())
    return 0


def _sign(args: argparse.Namespace) -> int:
    from ..runtime.manifest import load_signing_key, read_manifest, sign_manifest

    out = sign_manifest(args.sealed, load_signing_key(args.signing_key), overwrite=args.force)
    manifest = read_manifest(out)
    print(f"{out}: {manifest.model_id} version {manifest.key_version} sha256 "
          f"{manifest.sha256}")
    return 0
