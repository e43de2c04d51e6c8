"""``sealedtorch keys {register,policy,rotate,new,revoke,retire,list}``: the model owner's
side of the keyserver, over its admin API (thin wrappers over
:class:`~sealedtorch.keyserver.client.AdminClient`), and ``keys new``, which makes a key
file locally without any keyserver."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, KeyFileError
from .common import (
    Handler,
    add_command,
    add_json_flag,
    add_keyserver_options,
    add_noun,
    admin_client,
    check_model_id,
    check_output_dir,
    print_json,
    print_rows,
    refuse_existing_key_file,
)


def register(sub: argparse._SubParsersAction) -> None:
    ksub = add_noun(sub, "keys", help="manage model keys on a keyserver (owner)",
                    dest="keys_command")

    p = _model_command(ksub, "register", _register, help="register a model key and its policy",
                       model_help="the model id (as sealed)")
    p.add_argument("--key", type=Path, required=True, help="key file (from `sealedtorch seal`)")
    p.add_argument("--policy", type=Path, required=True, help="policy file (YAML/JSON)")
    add_json_flag(p)

    psub = add_noun(ksub, "policy", help="a model's policy: show or replace it",
                    dest="policy_command")
    p = _model_command(psub, "set", _policy_set, help="replace a model's policy")
    p.add_argument("--policy", type=Path, required=True, help="policy file (YAML/JSON)")
    add_json_flag(p)
    p = _model_command(psub, "show", _policy_show,
                       help="print a model's current policy and its digest",
                       description="Print the policy the keyserver enforces for a model "
                                   "(JSON, usable as a policy file), with its digest on "
                                   "stderr; --json prints both as one object.")
    add_json_flag(p)

    p = _model_command(ksub, "rotate", _rotate,
                       help="add a new key version (older ones stay until retired)",
                       description="Add a new key version: upload a key file whose version "
                                   "is above the latest (make one with `sealedtorch keys "
                                   "new --model-id ID --version N -o FILE`, or `seal "
                                   "--key-version N`), or let the keyserver generate it.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--key", type=Path, help="upload this key file as the new version")
    src.add_argument("--key-out", type=Path,
                     help="let the keyserver generate the key; write it here (mode 0600)")
    add_json_flag(p)

    p = add_command(ksub, "new", _keys_new,
                    help="generate a model key file locally (no keyserver)",
                    description="Write a fresh 256-bit key for MODEL_ID at key version N "
                                "to a new file (mode 0600): seal with it (`seal --key`), "
                                "then upload it with `keys rotate --key` (N above the "
                                "keyserver's latest version) or `keys register`.")
    p.add_argument("--model-id", required=True, help="the model id")
    p.add_argument("--version", type=int, default=1, metavar="N", help="the key version")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="the key file to create (never overwritten)")
    add_json_flag(p)

    for name, handler, helptext in (
            ("revoke", _revoke, "stop releasing a model (or one version) now"),
            ("retire", _retire, "retire a model (or one version): no releases, key erased")):
        p = _model_command(ksub, name, handler, help=helptext)
        p.add_argument("--version", type=int, help="one version (default: all)")
        p.add_argument("--reason", default="", help="recorded in the audit log")
        add_json_flag(p)

    p = add_command(ksub, "list", _list, help="list models, key versions and states")
    add_keyserver_options(p)
    add_json_flag(p)


def _model_command(sub: argparse._SubParsersAction, name: str, handler: Handler, *,
                   help: str, description: str | None = None,
                   model_help: str = "the model id") -> argparse.ArgumentParser:
    """A command about one model on the keyserver: connection options and ``--model-id``."""
    p = add_command(sub, name, handler, help=help, description=description)
    add_keyserver_options(p)
    p.add_argument("--model-id", required=True, help=model_help)
    return p


def _register(args: argparse.Namespace) -> int:
    from ..keys import read_key_file

    key = read_key_file(args.key)
    if key.model_id != args.model_id:
        raise KeyFileError(f"{args.key} holds the key of model {key.model_id!r}, not "
                           f"{args.model_id!r}")
    with admin_client(args) as admin:
        info = admin.register(key, args.policy)
    if args.json:
        print_json(info, sort_keys=True)
        return 0
    print(f"registered {info['model_id']} version {key.version} "
          f"(policy {info['policy_digest'][:16]}…)")
    return 0


def _policy_set(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        info = admin.set_policy(args.model_id, args.policy)
    if args.json:
        print_json(info, sort_keys=True)
        return 0
    print(f"policy of {info['model_id']} is now {info['policy_digest']}")
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        info = admin.get_model(args.model_id)
    if args.json:
        print_json({"model_id": info["model_id"], "policy": info["policy"],
                    "policy_digest": info["policy_digest"],
                    "updated_at": info.get("updated_at")}, sort_keys=True)
        return 0
    print_json(info["policy"], sort_keys=True)
    print(f"policy of {info['model_id']}: digest {info['policy_digest']} (updated "
          f"{info.get('updated_at')})", file=sys.stderr)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from ..keys import ModelKey, write_key_file

    check_model_id(args.model_id)
    check_output_dir(args.output, "--output")
    refuse_existing_key_file(args.output)
    try:
        key = ModelKey.generate(args.model_id, args.version)
    except ValueError as exc:
        raise ConfigError(f"--version: {exc}") from None
    path = write_key_file(args.output, key)
    if args.json:
        print_json({"model_id": key.model_id, "key_version": key.version,
                    "key_file": str(path)}, sort_keys=True)
        return 0
    print(f"new key for {key.model_id!r} version {key.version} written to {path} (mode "
          f"0600); seal with --key {path}, then upload it with `sealedtorch keys rotate "
          f"--model-id {key.model_id} --key {path}`")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from ..keys import read_key_file, write_key_file

    refuse_existing_key_file(args.key_out)
    with admin_client(args) as admin:
        if args.key is not None:
            version, _ = admin.rotate(args.model_id, read_key_file(args.key))
        else:
            version, key = admin.rotate(args.model_id)
            write_key_file(args.key_out, key)
    if args.json:
        print_json({"model_id": args.model_id, "key_version": version,
                    "key_file": str(args.key_out or args.key),
                    "generated_by_keyserver": args.key_out is not None}, sort_keys=True)
        return 0
    print(f"{args.model_id}: new key version {version}"
          + (f", key written to {args.key_out}" if args.key_out else ""))
    return 0


def _state_change(args: argparse.Namespace, action: str) -> int:
    with admin_client(args) as admin:
        result = getattr(admin, action)(args.model_id, args.version, args.reason)
    if args.json:
        print_json(result, sort_keys=True)
        return 0
    versions = ", ".join(str(v) for v in result["changed"])
    print(f"{result['model_id']}: version(s) {versions} {result['state']}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    return _state_change(args, "revoke")


def _retire(args: argparse.Namespace) -> int:
    return _state_change(args, "retire")


def _list(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        models = admin.list_models()
    print_rows(models, _model_line, as_json=args.json)
    return 0


def _model_line(m: dict[str, Any]) -> str:
    versions = ", ".join(f"v{v['version']} {v['state']}" for v in m["versions"])
    return f"{m['model_id']}  policy {m['policy_digest'][:16]}…  {versions}"
