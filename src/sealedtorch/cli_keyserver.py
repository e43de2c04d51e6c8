"""``sealedtorch keyserver {init,run,audit}``, ``sealedtorch keys {...}`` and
``sealedtorch attest fetch-key``: thin wrappers over :mod:`sealedtorch.keyserver`."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .cli import hidden_alias
from .errors import ConfigError, KeyFileError

ENV_URL = "SEALEDTORCH_KEYSERVER"
ENV_CA = "SEALEDTORCH_KEYSERVER_CA"
ENV_TOKEN = "SEALEDTORCH_ADMIN_TOKEN_FILE"  # noqa: S105 (a variable name)
ENV_DATABASE = "SEALEDTORCH_KEYSERVER_DATABASE"


def _database_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--database", default=os.environ.get(ENV_DATABASE) or None, metavar="URL",
                   help=f"PostgreSQL URL ({what}; ${ENV_DATABASE}); put the password in "
                        f"PGPASSWORD or ~/.pgpass, not in the URL")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (for scripts)")


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def register(sub: argparse._SubParsersAction) -> None:
    _add_keyserver(sub)
    _add_keys(sub)


# --------------------------------------------------------------------------- keyserver

def _add_keyserver(sub: argparse._SubParsersAction) -> None:
    ks = sub.add_parser("keyserver", help="run the keyserver (model keys, attested release)")
    ksub = ks.add_subparsers(dest="keyserver_command", metavar="COMMAND", required=True)

    p = ksub.add_parser("init", help="create a keyserver data directory",
                        description="Create the store (SQLite), KEK file, TLS CA and server "
                                    "certificate, token-signing key and a first admin token "
                                    "(written once to DIR/admin-token).")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="the data directory to create (must not hold a keyserver yet)")
    p.add_argument("--hostname", action="append", default=[],
                   help="extra DNS name or IP for the server certificate (repeatable; "
                        "127.0.0.1 and localhost are always included)")
    p.add_argument("--tls-cert", type=Path, help="use this server certificate (PEM) instead")
    p.add_argument("--tls-key", type=Path, help="... and its private key (PEM)")
    _database_arg(p, "the store for one or several replicas, instead of SQLite in DIR")
    _json_arg(p)
    p.set_defaults(handler=_init)

    p = ksub.add_parser("run", help="serve the keyserver API over TLS",
                        description="Serve the keyserver API over TLS until SIGTERM/SIGINT. "
                                    "Exits 2 at once (before opening the store) if the "
                                    "address is in use.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="the data directory made by `keyserver init`")
    p.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
                   help="address to serve on")
    p.add_argument("--trust-sim-root", type=Path, action="append", default=[], metavar="FILE",
                   help="trust this sim platform's platform.pub (INSECURE, development "
                        "only; repeatable)")
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="log lines on stderr: one JSON object each, or text")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.set_defaults(handler=_run)

    audit = ksub.add_parser("audit", help="inspect the audit log")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = asub.add_parser("verify", help="check the hash chain and the transparency log; "
                                       "exit 1 if broken",
                        description="Recompute the hash chain and the Merkle tree from the "
                                    "records themselves.  With --checkpoint, also prove "
                                    "that the log still extends a checkpoint saved earlier "
                                    "(rewritten, deleted, reordered or truncated history "
                                    "is detected even if the chain was recomputed).")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.add_argument("--checkpoint", type=Path, metavar="SAVED",
                   help="a signed checkpoint saved earlier (`audit checkpoint > FILE`)")
    p.add_argument("--log-key", metavar="VKEY",
                   help="the log's verifier key to check SAVED with (default: this data "
                        "directory's own key)")
    p.set_defaults(handler=_audit_verify)
    p = asub.add_parser("checkpoint", help="print the transparency log's signed checkpoint",
                        description="Print the current C2SP checkpoint (signed note). Keep "
                                    "copies somewhere the keyserver's operators cannot write: "
                                    "`audit verify --checkpoint` proves later logs extend it.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.add_argument("--log-key", action="store_true",
                   help="print the log's verifier key instead")
    p.set_defaults(handler=_audit_checkpoint)
    p = asub.add_parser("list", help="print audit records")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.add_argument("--model-id", dest="model", metavar="ID",
                   help="only records about this model")
    hidden_alias(p, "--model", dest="model")
    p.add_argument("--since", metavar="T", help="ISO 8601 time (UTC if no zone) or Unix time")
    p.add_argument("--limit", type=int, help="at most this many records")
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.set_defaults(handler=_audit_list)
    _add_kek_commands(ksub)
    _add_token_commands(ksub)


def _init(args: argparse.Namespace) -> int:
    from .keyserver.config import init_data_dir

    result = init_data_dir(args.data, hostnames=tuple(args.hostname), tls_cert=args.tls_cert,
                           tls_key=args.tls_key, now=time.time(), database=args.database)
    if args.json:
        _print_json({"data_dir": str(result.config.data_dir),
                     "ca_file": str(result.ca_file) if result.ca_file else None,
                     "admin_token_file": str(result.admin_token_file),
                     "listen": "127.0.0.1:8443"})
        return 0
    print(f"keyserver data directory: {result.config.data_dir}")
    if result.ca_file:
        print(f"CA certificate for clients (--ca): {result.ca_file}")
    print(f"admin token (keep it secret, mode 0600): {result.admin_token_file}")
    print(f"start it with: sealedtorch keyserver run --data {result.config.data_dir} "
          f"--listen 127.0.0.1:8443")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .keyserver.server import run

    run(args.data, args.listen, trust_sim_roots=args.trust_sim_root,
        log_format=args.log_format, database=args.database)
    return 0


def _open_store(data: Path, database: str | None = None) -> Any:
    from .keyserver.config import load_config, open_store, with_database

    return open_store(with_database(load_config(data), database))


def _audit_verify(args: argparse.Namespace) -> int:
    from .keyserver import tlog
    from .keyserver.audit import verify_chain

    saved = None
    if args.checkpoint is not None:
        try:
            saved = args.checkpoint.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--checkpoint {args.checkpoint}: cannot read it ({exc})"
                              ) from None
    verifier = None
    if saved is not None:
        verifier = tlog.Verifier.parse(args.log_key) if args.log_key else \
            tlog.read_verifier(args.data)
    store = _open_store(args.data, args.database)
    try:
        with store.snapshot() as tx:
            records = tx.audit_records()
            report = verify_chain(records)
            log_report = tlog.verify_log(tx, records, saved=saved, verifier=verifier)
    finally:
        store.close()
    ok = report.ok and log_report.ok
    if report.ok:
        print(f"audit log intact: {report.count} records; head #{report.head_seq} "
              f"{report.head_hash}")
    else:
        print(f"audit log BROKEN at record #{report.broken_at}: {report.problem} "
              f"({report.count} records before it are intact, last good hash "
              f"{report.head_hash})", file=sys.stderr)
    for problem in log_report.problems:
        print(f"transparency log BROKEN: {problem}", file=sys.stderr)
    if log_report.ok:
        root = base64.b64encode(log_report.root).decode()
        print(f"transparency log intact: {log_report.leaves} leaves, root {root}")
        if log_report.saved_size is not None:
            print(f"consistent with the saved checkpoint of {log_report.saved_size} leaves")
    return 0 if ok else 1


def _audit_checkpoint(args: argparse.Namespace) -> int:
    from .keyserver import tlog

    if args.log_key:
        print(tlog.read_verifier(args.data).vkey)
        return 0
    signer = tlog.read_signer(args.data)
    store = _open_store(args.data, args.database)
    try:
        with store.snapshot() as tx:
            _, note = tlog.TransparencyLog(signer).checkpoint(tx)
    finally:
        store.close()
    sys.stdout.write(note)
    return 0


def parse_since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: expected ISO 8601 or Unix time, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def _audit_list(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    store = _open_store(args.data, args.database)
    try:
        with store.snapshot() as tx:
            records = tx.audit_records(model_id=args.model, since=since, limit=args.limit)
    finally:
        store.close()
    for rec in records:
        if args.json:
            print(rec.record_json)
            continue
        body = rec.body
        who = body.get("actor") or body.get("client") or "-"
        what = rec.model_id or "-"
        if body.get("version") is not None:
            what += f" v{body['version']}"
        elif body.get("versions"):
            what += " v" + ",".join(str(v) for v in body["versions"])
        line = f"#{rec.seq} {body.get('iso_time')} {rec.event} {rec.decision} {what} by {who}"
        if body.get("insecure"):
            line += " INSECURE"
        if body.get("problem"):
            line += f" [{body['problem']}]"
        reasons = body.get("reasons") or []
        if reasons and rec.decision != "ok":
            line += " — " + "; ".join(str(r) for r in reasons)
        print(line)
    return 0


# --------------------------------------------------------------------------- KEK

def _add_kek_commands(ksub: argparse._SubParsersAction) -> None:
    p = ksub.add_parser(
        "rewrap", help="move every wrapped key to another KEK (servers keep running)",
        description="Stage the target KEK as read-only, re-wrap each key under it (one "
                    "transaction per key, audited), make it the active KEK and keep the old "
                    "one as a read-only fallback.  Safe to interrupt: run it again to "
                    "finish.  TARGET: file:PATH (created if missing) or pkcs11:token=...;"
                    "object=...?module-path=...&pin-source=file:/path|env:NAME")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--to", required=True, metavar="TARGET", help="file:PATH or pkcs11:URI")
    p.add_argument("--stage-only", action="store_true",
                   help="only add TARGET as a read-only KEK (on other replicas' data "
                        "directories, before the rewrap)")
    p.add_argument("--prune", action="store_true",
                   help="afterwards, drop fallback KEKs no record references any more")
    p.add_argument("--quiet", action="store_true", help="no per-key progress lines")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.set_defaults(handler=_rewrap)

    kek = ksub.add_parser("kek", help="key-encryption keys: status, create a PKCS#11 KEK")
    kksub = kek.add_subparsers(dest="kek_command", metavar="COMMAND", required=True)
    p = kksub.add_parser("status", help="configured KEKs and how many keys each wraps")
    p.add_argument("--data", type=Path, required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p.set_defaults(handler=_kek_status)
    p = kksub.add_parser("create", help="generate a non-extractable AES-256 KEK in a "
                                        "PKCS#11 token")
    p.add_argument("uri", metavar="PKCS11_URI",
                   help="pkcs11:token=LABEL;object=KEYLABEL?module-path=...&pin-source=...")
    p.set_defaults(handler=_kek_create)


def _rewrap(args: argparse.Namespace) -> int:
    from .keyserver.rewrap import rewrap

    def progress(done: int, total: int, rec: Any, old: str | None, new: str) -> None:
        print(f"[{done}/{total}] {rec.model_id} v{rec.version}: {old} -> {new}", flush=True)

    report = rewrap(args.data, args.to, progress=None if args.quiet else progress,
                    stage_only=args.stage_only, prune=args.prune, database=args.database)
    if args.stage_only:
        print(f"{report.target} {'staged' if report.staged else 'was already configured'} "
              f"as a read-only KEK")
        return 0
    print(f"rewrap to {report.target} complete: {report.moved} moved, {report.skipped} "
          f"changed meanwhile" + ("; now the active KEK" if report.switched else ""))
    others = {k: n for k, n in report.usage.items() if k != report.target}
    for kek_id, n in sorted(others.items(), key=lambda kv: str(kv[0])):
        print(f"  still {n} record(s) under {kek_id}: run rewrap again", file=sys.stderr)
    for kek_id in report.pruned:
        print(f"  pruned unused fallback KEK {kek_id}")
    return 1 if others else 0


def _kek_status(args: argparse.Namespace) -> int:
    from .keyserver.rewrap import kek_status

    rows = kek_status(args.data, database=args.database)
    if args.json:
        print(json.dumps([{"role": r.role, "kek_id": r.kek_id, "where": r.where,
                           "records": r.records} for r in rows], indent=2))
    else:
        for r in rows:
            print(f"{r.role:<12} {r.kek_id}  {r.records} record(s)  {r.where}")
    return 1 if any(r.role == "unconfigured" for r in rows) else 0


def _kek_create(args: argparse.Namespace) -> int:
    from .keyserver.kek_pkcs11 import Pkcs11Kek

    kek = Pkcs11Kek.create(args.uri)
    try:
        print(f"created {kek.kek_id} ({kek.uri.describe_key()} on token {kek.uri.token!r}); "
              f"move keys under it with: sealedtorch keyserver rewrap --data DIR --to "
              f"'{kek.uri}'")
    finally:
        kek.close()
    return 0


# --------------------------------------------------------------------------- tokens

def _add_token_commands(ksub: argparse._SubParsersAction) -> None:
    tok = ksub.add_parser("tokens", help="admin, owner and auditor tokens (needs an admin "
                                         "token)")
    tsub = tok.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    p = tsub.add_parser("create", help="create a token; it is shown once",
                        description="admin: everything; owner: only the models it registers "
                                    "(a second token with the --name of a valid owner token "
                                    "shares its models; a name whose tokens were all "
                                    "revoked or expired is a new owner); auditor: reads the "
                                    "audit log.  Tokens expire (default 90 days).")
    _connection_args(p)
    p.add_argument("--role", required=True, choices=["admin", "owner", "auditor"],
                   help="what the token may do (see above)")
    p.add_argument("--name", required=True, help="who holds it (for owners: the owner)")
    p.add_argument("--expires", type=_duration, metavar="DURATION", default=None,
                   help="lifetime: 90d (default), 12h, 30m, 3600s, ...")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the token to this new file (mode 0600) instead of stdout")
    _json_arg(p)
    p.set_defaults(handler=_tokens_create)
    p = tsub.add_parser("rotate", help="replace a token by a new one (same identity, name "
                                       "and role); the old one is revoked at once")
    _connection_args(p)
    p.add_argument("token_id", metavar="TOKEN_ID", help="as `tokens list` shows (adm_…)")
    p.add_argument("--expires", type=_duration, metavar="DURATION", default=None,
                   help="the new token's lifetime (default 90d)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the new token to this new file (mode 0600) instead of stdout")
    p.set_defaults(handler=_tokens_rotate)
    p = tsub.add_parser("list", help="list tokens (ids, names, roles, states)")
    _connection_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_tokens_list)
    p = tsub.add_parser("revoke", help="revoke a token now")
    _connection_args(p)
    p.add_argument("token_id", metavar="TOKEN_ID", help="as `tokens list` shows (adm_…)")
    p.set_defaults(handler=_tokens_revoke)


def _duration(text: str) -> int:
    """``90d``, ``12h``, ``30m``, ``3600s`` or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    factor = units.get(value[-1:], None)
    number = value[:-1] if factor is not None else value
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)")
    return int(number) * (factor or 1)


def _tokens_create(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.exists():
        raise KeyFileError(f"{args.output}: already exists; refusing to overwrite it")
    with _admin(args) as admin:
        created = admin.create_token(args.role, args.name, expires_in=args.expires)
    _print_new_token(args, created)
    return 0


def _tokens_rotate(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.exists():
        raise KeyFileError(f"{args.output}: already exists; refusing to overwrite it")
    with _admin(args) as admin:
        created = admin.rotate_token(args.token_id, expires_in=args.expires)
    _print_new_token(args, created)
    print(f"token {created.get('rotated_from')} revoked", file=sys.stderr)
    return 0


def _print_new_token(args: argparse.Namespace, created: dict[str, Any]) -> None:
    from .keyserver.config import write_new

    what = (f"{created['role']} token {created['token_id']} for {created['name']!r}, "
            f"expires {created.get('expires_at')}")
    if getattr(args, "json", False):
        doc = {k: v for k, v in created.items() if k != "token"}
        if args.output is not None:
            write_new(args.output, (created["token"] + "\n").encode())
            doc["token_file"] = str(args.output)
        else:
            doc["token"] = created["token"]  # asked for on stdout: shown once
        _print_json(doc)
        return
    if args.output is not None:
        write_new(args.output, (created["token"] + "\n").encode())
        print(f"{what}, written to {args.output}")
    else:
        print(created["token"])
        print(f"{what} (shown once; store it in a 0600 file)", file=sys.stderr)


def _tokens_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        tokens = admin.list_tokens()
    if args.json:
        print(json.dumps(tokens, indent=2))
        return 0
    for t in tokens:
        state = f"revoked {t['revoked_at']}" if t.get("revoked_at") else "valid"
        expires = t.get("expires_at")
        if not t.get("revoked_at") and expires and datetime.datetime.fromisoformat(
                expires.replace("Z", "+00:00")) <= datetime.datetime.now(datetime.UTC):
            state = "expired (renew: tokens rotate)"
        if not t.get("intact", True):
            state = "TAMPERED (row fails its MAC; refused)"
        print(f"{t['token_id']}  {t['role']:<8} {t['name']:<24} created {t['created_at']}  "
              f"expires {t.get('expires_at') or 'never'}  {state}")
    return 0


def _tokens_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        t = admin.revoke_token(args.token_id)
    print(f"token {t['token_id']} ({t['role']} {t['name']!r}) revoked at {t['revoked_at']}")
    return 0


# --------------------------------------------------------------------------- keys

def _connection_args(p: argparse.ArgumentParser, *, token: bool = True) -> None:
    p.add_argument("--keyserver", default=os.environ.get(ENV_URL), metavar="URL",
                   help=f"keyserver base URL, e.g. https://127.0.0.1:8443 (${ENV_URL})")
    p.add_argument("--ca", type=Path, default=os.environ.get(ENV_CA), metavar="FILE",
                   help=f"the keyserver's CA certificate (${ENV_CA})")
    if token:
        p.add_argument("--token-file", type=Path, default=os.environ.get(ENV_TOKEN),
                       metavar="F", help=f"admin token file (${ENV_TOKEN})")


def _add_keys(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage model keys on a keyserver (owner)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    p = ksub.add_parser("register", help="register a model key and its policy")
    _connection_args(p)
    p.add_argument("--model-id", required=True, help="the model id (as sealed)")
    p.add_argument("--key", type=Path, required=True, help="key file (from `sealedtorch seal`)")
    p.add_argument("--policy", type=Path, required=True, help="policy file (YAML/JSON)")
    _json_arg(p)
    p.set_defaults(handler=_register)

    pol = ksub.add_parser("policy", help="a model's policy: show or replace it")
    psub = pol.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    p = psub.add_parser("set", help="replace a model's policy")
    _connection_args(p)
    p.add_argument("--model-id", required=True, help="the model id")
    p.add_argument("--policy", type=Path, required=True, help="policy file (YAML/JSON)")
    _json_arg(p)
    p.set_defaults(handler=_policy_set)
    p = psub.add_parser("show", help="print a model's current policy and its digest",
                        description="Print the policy the keyserver enforces for a model "
                                    "(JSON, usable as a policy file), with its digest on "
                                    "stderr; --json prints both as one object.")
    _connection_args(p)
    p.add_argument("--model-id", required=True, help="the model id")
    _json_arg(p)
    p.set_defaults(handler=_policy_show)

    p = ksub.add_parser("rotate", help="add a new key version (older ones stay until retired)",
                        description="Add a new key version: upload a key file whose version "
                                    "is above the latest (make one with `sealedtorch keys "
                                    "new --model-id ID --version N -o FILE`, or `seal "
                                    "--key-version N`), or let the keyserver generate it.")
    _connection_args(p)
    p.add_argument("--model-id", required=True, help="the model id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--key", type=Path, help="upload this key file as the new version")
    src.add_argument("--key-out", type=Path,
                     help="let the keyserver generate the key; write it here (mode 0600)")
    _json_arg(p)
    p.set_defaults(handler=_rotate)

    p = ksub.add_parser("new", help="generate a model key file locally (no keyserver)",
                        description="Write a fresh 256-bit key for MODEL_ID at key version N "
                                    "to a new file (mode 0600): seal with it (`seal --key`), "
                                    "then upload it with `keys rotate --key` (N above the "
                                    "keyserver's latest version) or `keys register`.")
    p.add_argument("--model-id", required=True, help="the model id")
    p.add_argument("--version", type=int, default=1, metavar="N", help="the key version")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="the key file to create (never overwritten)")
    _json_arg(p)
    p.set_defaults(handler=_keys_new)

    for name, helptext in (("revoke", "stop releasing a model (or one version) now"),
                           ("retire", "retire a model (or one version): no releases, key "
                                      "erased")):
        p = ksub.add_parser(name, help=helptext)
        _connection_args(p)
        p.add_argument("--model-id", required=True, help="the model id")
        p.add_argument("--version", type=int, help="one version (default: all)")
        p.add_argument("--reason", default="", help="recorded in the audit log")
        _json_arg(p)
        p.set_defaults(handler=_revoke if name == "revoke" else _retire)

    p = ksub.add_parser("list", help="list models, key versions and states")
    _connection_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_list)


_ENV_OF = {"keyserver": ENV_URL, "ca": ENV_CA, "token_file": ENV_TOKEN}


def _need(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            flag = "--" + name.replace("_", "-")
            env = f" (or set ${_ENV_OF[name]})" if name in _ENV_OF else ""
            raise ConfigError(f"{flag} is required{env}")


def _admin(args: argparse.Namespace) -> Any:
    from .cli import check_https_url
    from .cli_format import check_model_id
    from .keyserver.client import AdminClient

    if getattr(args, "model_id", None) is not None:
        check_model_id(args.model_id)
    _need(args, "keyserver", "token_file")
    check_https_url(args.keyserver, "--keyserver")
    return AdminClient.from_token_file(args.keyserver, args.ca, args.token_file)


def _register(args: argparse.Namespace) -> int:
    from .keys import read_key_file

    key = read_key_file(args.key)
    if key.model_id != args.model_id:
        raise KeyFileError(f"{args.key} holds the key of model {key.model_id!r}, not "
                           f"{args.model_id!r}")
    with _admin(args) as admin:
        info = admin.register(key, args.policy)
    if args.json:
        _print_json(info)
        return 0
    print(f"registered {info['model_id']} version {key.version} "
          f"(policy {info['policy_digest'][:16]}…)")
    return 0


def _policy_set(args: argparse.Namespace) -> int:
    from .cli_format import check_model_id

    check_model_id(args.model_id)
    with _admin(args) as admin:
        info = admin.set_policy(args.model_id, args.policy)
    if args.json:
        _print_json(info)
        return 0
    print(f"policy of {info['model_id']} is now {info['policy_digest']}")
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    from .cli_format import check_model_id

    check_model_id(args.model_id)
    with _admin(args) as admin:
        info = admin.get_model(args.model_id)
    if args.json:
        _print_json({"model_id": info["model_id"], "policy": info["policy"],
                     "policy_digest": info["policy_digest"],
                     "updated_at": info.get("updated_at")})
        return 0
    print(json.dumps(info["policy"], indent=2, sort_keys=True))
    print(f"policy of {info['model_id']}: digest {info['policy_digest']} (updated "
          f"{info.get('updated_at')})", file=sys.stderr)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from .cli_format import check_model_id, check_output_dir
    from .keys import ModelKey, write_key_file

    check_model_id(args.model_id)
    check_output_dir(args.output, "--output")
    if args.output.exists():
        raise KeyFileError(f"{args.output}: already exists; refusing to overwrite a key file")
    try:
        key = ModelKey.generate(args.model_id, args.version)
    except ValueError as exc:
        raise ConfigError(f"--version: {exc}") from None
    path = write_key_file(args.output, key)
    if args.json:
        _print_json({"model_id": key.model_id, "key_version": key.version,
                     "key_file": str(path)})
        return 0
    print(f"new key for {key.model_id!r} version {key.version} written to {path} (mode "
          f"0600); seal with --key {path}, then upload it with `sealedtorch keys rotate "
          f"--model-id {key.model_id} --key {path}`")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from .keys import read_key_file, write_key_file

    if args.key_out is not None and args.key_out.exists():
        raise KeyFileError(f"{args.key_out}: already exists; refusing to overwrite a key file")
    with _admin(args) as admin:
        if args.key is not None:
            version, _ = admin.rotate(args.model_id, read_key_file(args.key))
        else:
            version, key = admin.rotate(args.model_id)
            write_key_file(args.key_out, key)
    if args.json:
        _print_json({"model_id": args.model_id, "key_version": version,
                     "key_file": str(args.key_out or args.key),
                     "generated_by_keyserver": args.key_out is not None})
        return 0
    print(f"{args.model_id}: new key version {version}"
          + (f", key written to {args.key_out}" if args.key_out else ""))
    return 0


def _state_change(args: argparse.Namespace, action: str) -> int:
    with _admin(args) as admin:
        result = getattr(admin, action)(args.model_id, args.version, args.reason)
    if args.json:
        _print_json(result)
        return 0
    versions = ", ".join(str(v) for v in result["changed"])
    print(f"{result['model_id']}: version(s) {versions} {result['state']}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    return _state_change(args, "revoke")


def _retire(args: argparse.Namespace) -> int:
    return _state_change(args, "retire")


def _list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        models = admin.list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        versions = ", ".join(f"v{v['version']} {v['state']}" for v in m["versions"])
        print(f"{m['model_id']}  policy {m['policy_digest'][:16]}…  {versions}")
    return 0


# --------------------------------------------------------------------------- fetch-key

def add_fetch_key_parser(attest_subparsers: argparse._SubParsersAction) -> None:
    """Add ``fetch-key`` to the ``attest`` group (called from :mod:`cli_attest`)."""
    p = attest_subparsers.add_parser(
        "fetch-key", help="attest to a keyserver and fetch one model key (diagnostic)",
        description="Challenge, evidence, attest, fetch and HPKE-open one model key, as a "
                    "runtime would, and write it to a key file (mode 0600).")
    _connection_args(p, token=False)
    p.add_argument("--tee", default="auto", choices=["auto", "sgx", "tdx", "snp", "sim"])
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
    p.set_defaults(handler=_fetch_key)


def _fetch_key(args: argparse.Namespace) -> int:
    from .attest.attesters import get_attester
    from .cli import check_https_url
    from .cli_format import check_model_id
    from .keys import write_key_file
    from .keyserver.client import AttestedKeyClient

    check_model_id(args.model_id)
    _need(args, "keyserver")
    check_https_url(args.keyserver, "--keyserver")
    if args.output.exists():
        raise KeyFileError(f"{args.output}: already exists; refusing to overwrite a key file")
    config = b""
    if args.runtime_config is not None:
        try:
            config = args.runtime_config.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.runtime_config}: {exc.strerror}") from None
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
