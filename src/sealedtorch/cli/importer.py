"""``sealedtorch import``: migrate model files made by other tools into sealed files."""

from __future__ import annotations

import argparse
import binascii
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import add_command, add_noun, check_model_id, parse_metadata, refuse_existing_output

KEY_ENV = "SEALEDTORCH_SGX_PYTORCH_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    kinds = add_noun(sub, "import", help="convert another tool's encrypted checkpoint into a "
                                         ".sealed file under a fresh key",
                     dest="kind", metavar="KIND")
    s = add_command(
        kinds, "sgx-pytorch", _import_sgx_pytorch,
        help="a checkpoint encrypted by sgx-pytorch's to_secure_mkldnn",
        description="Decrypt every encrypted_* buffer of an sgx-pytorch checkpoint "
                    "(AES-128-GCM, tag checked), rebuild the plain state dict under the "
                    "original names, and seal it under a fresh sealedtorch key. The "
                    "plaintext never touches disk.")
    s.add_argument("input", type=Path, help="the sgx-pytorch checkpoint (.pt/.pth)")
    s.add_argument("-o", "--output", type=Path, required=True, help="the .sealed file to write")
    s.add_argument("--model-id", required=True, help="model id for the new sealed file")
    s.add_argument("--key-out", type=Path, required=True,
                   help="where to write the fresh 256-bit sealedtorch key (mode 0600)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--key", metavar="HEX",
                     help="the sgx-pytorch AES-128 key, 32 hex digits (visible to other "
                          f"processes on the command line: prefer --key-file or ${KEY_ENV})")
    src.add_argument("--key-file", type=Path, metavar="FILE",
                     help="a file holding the sgx-pytorch key as 32 hex digits")
    s.add_argument("--source-model-id", metavar="HEX",
                   help="refuse the file unless its buffers carry this sgx-pytorch model id "
                        "(4 bytes as stored, e.g. 07000000)")
    s.add_argument("--keep-zero-conv-bias", action="store_true",
                   help="keep the all-zero bias sgx-pytorch adds to bias-less Conv2d layers "
                        "(dropped by default, so the names match the original model)")
    s.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="string metadata stored in the encrypted header (repeatable)")
    s.add_argument("--force", action="store_true", help="replace an existing output file")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _hex(value: str, what: str, size: int) -> bytes:
    try:
        raw = binascii.unhexlify(value.strip())
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: not hexadecimal") from None
    if len(raw) != size:
        raise ConfigError(f"{what}: expected {2 * size} hex digits, got {len(value.strip())}")
    return raw


def _legacy_key(args: argparse.Namespace) -> bytes:
    if args.key is not None:
        return _hex(args.key, "--key", 16)
    if args.key_file is not None:
        try:
            text = args.key_file.read_text()
        except OSError as exc:
            raise ConfigError(f"--key-file {args.key_file}: {exc.strerror}") from None
        return _hex(text, f"--key-file {args.key_file}", 16)
    if os.environ.get(KEY_ENV):
        return _hex(os.environ[KEY_ENV], f"${KEY_ENV}", 16)
    raise ConfigError(f"the sgx-pytorch key is needed: --key HEX, --key-file FILE or ${KEY_ENV}")


def _import_sgx_pytorch(args: argparse.Namespace) -> int:
    from ..format import seal
    from ..format.importers import import_sgx_pytorch
    from ..keys import ModelKey, write_key_file

    check_model_id(args.model_id)
    metadata = parse_metadata(args.metadata, [])
    legacy_key = _legacy_key(args)
    expect = _hex(args.source_model_id, "--source-model-id", 4) \
        if args.source_model_id else None
    refuse_existing_output(args.output, args.force)
    imported = import_sgx_pytorch(args.input, legacy_key, expect_model_id=expect,
                                  keep_zero_conv_bias=args.keep_zero_conv_bias)
    key = ModelKey.generate(args.model_id)
    created = write_key_file(args.key_out, key)
    try:
        sealed = seal(imported.state_dict, args.output, key=key,
                      metadata={"imported_from": "sgx-pytorch", **metadata},
                      overwrite=args.force, progress=False if args.quiet else None)
    except BaseException:
        created.unlink(missing_ok=True)  # the key protects nothing that exists
        raise
    r = sealed
    print(f"imported {len(imported.decrypted)} encrypted tensors of sgx-pytorch model "
          f"{imported.source_model_id.hex()} ({args.input})")
    for name in imported.dropped_zero_biases:
        print(f"  dropped {name}: the all-zero bias sgx-pytorch adds to a bias-less Conv2d "
              "(--keep-zero-conv-bias keeps it)", file=sys.stderr)
    for name in imported.restored_counters:
        print(f"  restored {name} = 0 (sgx-pytorch drops it; used only in training)",
              file=sys.stderr)
    print(f"sealed {r.tensor_count} tensors of model {r.model_id!r} key version "
          f"{r.key_version} -> {r.path}; new key written to {created} (mode 0600)")
    return 0
