"""``sealedtorch keyserver {init,run,audit,rewrap,kek,tokens}``: the keyserver operator's
commands, thin wrappers over :mod:`sealedtorch.keyserver`.  Most work on the data directory
(``--data``) and its store directly; ``tokens`` goes through the admin API.  The owner's
commands are :mod:`.keys`, the auditor's :mod:`.audit`."""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, KeyFileError
from .common import (
    add_command,
    add_json_flag,
    add_keyserver_options,
    add_noun,
    admin_client,
    hidden_alias,
    print_json,
    print_rows,
    read_checkpoint,
)

ENV_DATABASE = "SEALEDTORCH_KEYSERVER_DATABASE"


def _data_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help=help)


def _store_args(p: argparse.ArgumentParser) -> None:
    """A command that opens the store of the data directory (or of ``--database``)."""
    _data_arg(p)
    _database_arg(p, "replaces the store named in DIR/keyserver.json")


def _database_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--database", default=os.environ.get(ENV_DATABASE) or None, metavar="URL",
                   help=f"PostgreSQL URL ({what}; ${ENV_DATABASE}); put the password in "
                        f"PGPASSWORD or ~/.pgpass, not in the URL")


# --------------------------------------------------------------------------- keyserver

def register(sub: argparse._SubParsersAction) -> None:
    ksub = add_noun(sub, "keyserver", help="run the keyserver (model keys, attested release)",
                    dest="keyserver_command")

    p = add_command(ksub, "init", _init, help="create a keyserver data directory",
                    description="Create the store (SQLite), KEK file, TLS CA and server "
                                "certificate, token-signing key and a first admin token "
                                "(written once to DIR/admin-token).")
    _data_arg(p, help="the data directory to create (must not hold a keyserver yet)")
    p.add_argument("--hostname", action="append", default=[],
                   help="extra DNS name or IP for the server certificate (repeatable; "
                        "127.0.0.1 and localhost are always included)")
    p.add_argument("--tls-cert", type=Path, help="use this server certificate (PEM) instead")
    p.add_argument("--tls-key", type=Path, help="... and its private key (PEM)")
    _database_arg(p, "the store for one or several replicas, instead of SQLite in DIR")
    add_json_flag(p)

    p = add_command(ksub, "run", _run, help="serve the keyserver API over TLS",
                    description="Serve the keyserver API over TLS until SIGTERM/SIGINT. "
                                "Exits 2 at once (before opening the store) if the "
                                "address is in use.")
    _data_arg(p, help="the data directory made by `keyserver init`")
    p.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT",
                   help="address to serve on")
    p.add_argument("--trust-sim-root", type=Path, action="append", default=[], metavar="FILE",
                   help="trust this sim platform's platform.pub (INSECURE, development "
                        "only; repeatable)")
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="log lines on stderr: one JSON object each, or text")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    _add_audit_commands(ksub)
    _add_kek_commands(ksub)
    _add_token_commands(ksub)


def _add_audit_commands(ksub: argparse._SubParsersAction) -> None:
    asub = add_noun(ksub, "audit", help="inspect the audit log", dest="audit_command")
    p = add_command(asub, "verify", _audit_verify,
                    help="check the hash chain and the transparency log; exit 1 if broken",
                    description="Recompute the hash chain and the Merkle tree from the "
                                "records themselves.  With --checkpoint, also prove "
                                "that the log still extends a checkpoint saved earlier "
                                "(rewritten, deleted, reordered or truncated history "
                                "is detected even if the chain was recomputed).")
    _store_args(p)
    p.add_argument("--checkpoint", type=Path, metavar="SAVED",
                   help="a signed checkpoint saved earlier (`audit checkpoint > FILE`)")
    p.add_argument("--log-key", metavar="VKEY",
                   help="the log's verifier key to check SAVED with (default: this data "
                        "directory's own key)")
    p = add_command(asub, "checkpoint", _audit_checkpoint,
                    help="print the transparency log's signed checkpoint",
                    description="Print the current C2SP checkpoint (signed note). Keep "
                                "copies somewhere the keyserver's operators cannot write: "
                                "`audit verify --checkpoint` proves later logs extend it.")
    _store_args(p)
    p.add_argument("--log-key", action="store_true",
                   help="print the log's verifier key instead")
    p = add_command(asub, "list", _audit_list, help="print audit records")
    _store_args(p)
    p.add_argument("--model-id", dest="model", metavar="ID",
                   help="only records about this model")
    hidden_alias(p, "--model", dest="model")
    p.add_argument("--since", metavar="T", help="ISO 8601 time (UTC if no zone) or Unix time")
    p.add_argument("--limit", type=int, help="at most this many records")
    add_json_flag(p, help="one JSON record per line")


def _init(args: argparse.Namespace) -> int:
    from ..keyserver.config import init_data_dir

    result = init_data_dir(args.data, hostnames=tuple(args.hostname), tls_cert=args.tls_cert,
                           tls_key=args.tls_key, now=time.time(), database=args.database)
    if args.json:
        print_json({"data_dir": str(result.config.data_dir),
                    "ca_file": str(result.ca_file) if result.ca_file else None,
                    "admin_token_file": str(result.admin_token_file),
                    "listen": "127.0.0.1:8443"}, sort_keys=True)
        return 0
    print(f"keyserver data directory: {result.config.data_dir}")
    if result.ca_file:
        print(f"CA certificate for clients (--ca): {result.ca_file}")
    print(f"admin token (keep it secret, mode 0600): {result.admin_token_file}")
    print(f"start it with: sealedtorch keyserver run --data {result.config.data_dir} "
          f"--listen 127.0.0.1:8443")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..keyserver.server import run

    run(args.data, args.listen, trust_sim_roots=args.trust_sim_root,
        log_format=args.log_format, database=args.database)
    return 0


def _open_store(data: Path, database: str | None = None) -> Any:
    from ..keyserver.config import load_config, open_store, with_database

    return open_store(with_database(load_config(data), database))


def _audit_verify(args: argparse.Namespace) -> int:
    from ..keyserver import tlog
    from ..keyserver.audit import verify_chain

    saved = read_checkpoint(args.checkpoint)
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
    from ..keyserver import tlog

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
    p = add_command(
        ksub, "rewrap", _rewrap,
        help="move every wrapped key to another KEK (servers keep running)",
        description="Stage the target KEK as read-only, re-wrap each key under it (one "
                    "transaction per key, audited), make it the active KEK and keep the old "
                    "one as a read-only fallback.  Safe to interrupt: run it again to "
                    "finish.  TARGET: file:PATH (created if missing) or pkcs11:token=...;"
                    "object=...?module-path=...&pin-source=file:/path|env:NAME")
    _data_arg(p)
    p.add_argument("--to", required=True, metavar="TARGET", help="file:PATH or pkcs11:URI")
    p.add_argument("--stage-only", action="store_true",
                   help="only add TARGET as a read-only KEK (on other replicas' data "
                        "directories, before the rewrap)")
    p.add_argument("--prune", action="store_true",
                   help="afterwards, drop fallback KEKs no record references any more")
    p.add_argument("--quiet", action="store_true", help="no per-key progress lines")
    _database_arg(p, "replaces the store named in DIR/keyserver.json")

    kksub = add_noun(ksub, "kek", help="key-encryption keys: status, create a PKCS#11 KEK",
                     dest="kek_command")
    p = add_command(kksub, "status", _kek_status,
                    help="configured KEKs and how many keys each wraps")
    _data_arg(p)
    add_json_flag(p)
    _database_arg(p, "replaces the store named in DIR/keyserver.json")
    p = add_command(kksub, "create", _kek_create,
                    help="generate a non-extractable AES-256 KEK in a PKCS#11 token")
    p.add_argument("uri", metavar="PKCS11_URI",
                   help="pkcs11:token=LABEL;object=KEYLABEL?module-path=...&pin-source=...")


def _rewrap(args: argparse.Namespace) -> int:
    from ..keyserver.rewrap import rewrap

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
    from ..keyserver.rewrap import kek_status

    rows = kek_status(args.data, database=args.database)
    print_rows(rows, lambda r: f"{r.role:<12} {r.kek_id}  {r.records} record(s)  {r.where}",
               as_json=args.json, doc=[{"role": r.role, "kek_id": r.kek_id, "where": r.where,
                                        "records": r.records} for r in rows])
    return 1 if any(r.role == "unconfigured" for r in rows) else 0


def _kek_create(args: argparse.Namespace) -> int:
    from ..keyserver.kek_pkcs11 import Pkcs11Kek

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
    tsub = add_noun(ksub, "tokens",
                    help="admin, owner and auditor tokens (needs an admin token)",
                    dest="tokens_command")
    p = add_command(tsub, "create", _tokens_create, help="create a token; it is shown once",
                    description="admin: everything; owner: only the models it registers "
                                "(a second token with the --name of a valid owner token "
                                "shares its models; a name whose tokens were all "
                                "revoked or expired is a new owner); auditor: reads the "
                                "audit log.  Tokens expire (default 90 days).")
    add_keyserver_options(p)
    p.add_argument("--role", required=True, choices=["admin", "owner", "auditor"],
                   help="what the token may do (see above)")
    p.add_argument("--name", required=True, help="who holds it (for owners: the owner)")
    _new_token_options(p, expires_help="lifetime: 90d (default), 12h, 30m, 3600s, ...",
                       output_help="write the token to this new file (mode 0600) instead "
                                   "of stdout")
    add_json_flag(p)
    p = add_command(tsub, "rotate", _tokens_rotate,
                    help="replace a token by a new one (same identity, name and role); the "
                         "old one is revoked at once")
    add_keyserver_options(p)
    _token_id_argument(p)
    _new_token_options(p, expires_help="the new token's lifetime (default 90d)",
                       output_help="write the new token to this new file (mode 0600) "
                                   "instead of stdout")
    p = add_command(tsub, "list", _tokens_list, help="list tokens (ids, names, roles, states)")
    add_keyserver_options(p)
    add_json_flag(p)
    p = add_command(tsub, "revoke", _tokens_revoke, help="revoke a token now")
    add_keyserver_options(p)
    _token_id_argument(p)


def _token_id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("token_id", metavar="TOKEN_ID", help="as `tokens list` shows (adm_…)")


def _new_token_options(p: argparse.ArgumentParser, *, expires_help: str,
                       output_help: str) -> None:
    """What a command that makes a token takes: its lifetime, and the file it goes to."""
    p.add_argument("--expires", type=_duration, metavar="DURATION", default=None,
                   help=expires_help)
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help=output_help)


def _duration(text: str) -> int:
    """``90d``, ``12h``, ``30m``, ``3600s`` or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    factor = units.get(value[-1:], None)
    number = value[:-1] if factor is not None else value
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)")
    return int(number) * (factor or 1)


def _refuse_existing_token_file(path: Path | None) -> None:
    if path is not None and path.exists():
        raise KeyFileError(f"{path}: already exists; refusing to overwrite it")


def _tokens_create(args: argparse.Namespace) -> int:
    _refuse_existing_token_file(args.output)
    with admin_client(args) as admin:
        created = admin.create_token(args.role, args.name, expires_in=args.expires)
    _print_new_token(args, created)
    return 0


def _tokens_rotate(args: argparse.Namespace) -> int:
    _refuse_existing_token_file(args.output)
    with admin_client(args) as admin:
        created = admin.rotate_token(args.token_id, expires_in=args.expires)
    _print_new_token(args, created)
    print(f"token {created.get('rotated_from')} revoked", file=sys.stderr)
    return 0


def _print_new_token(args: argparse.Namespace, created: dict[str, Any]) -> None:
    from ..keyserver.config import write_new

    what = (f"{created['role']} token {created['token_id']} for {created['name']!r}, "
            f"expires {created.get('expires_at')}")
    if getattr(args, "json", False):
        doc = {k: v for k, v in created.items() if k != "token"}
        if args.output is not None:
            write_new(args.output, (created["token"] + "\n").encode())
            doc["token_file"] = str(args.output)
        else:
            doc["token"] = created["token"]  # asked for on stdout: shown once
        print_json(doc, sort_keys=True)
        return
    if args.output is not None:
        write_new(args.output, (created["token"] + "\n").encode())
        print(f"{what}, written to {args.output}")
    else:
        print(created["token"])
        print(f"{what} (shown once; store it in a 0600 file)", file=sys.stderr)


def _tokens_list(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        tokens = admin.list_tokens()
    print_rows(tokens, _token_line, as_json=args.json)
    return 0


def _token_line(t: dict[str, Any]) -> str:
    state = f"revoked {t['revoked_at']}" if t.get("revoked_at") else "valid"
    expires = t.get("expires_at")
    if not t.get("revoked_at") and expires and datetime.datetime.fromisoformat(
            expires.replace("Z", "+00:00")) <= datetime.datetime.now(datetime.UTC):
        state = "expired (renew: tokens rotate)"
    if not t.get("intact", True):
        state = "TAMPERED (row fails its MAC; refused)"
    return (f"{t['token_id']}  {t['role']:<8} {t['name']:<24} created {t['created_at']}  "
            f"expires {t.get('expires_at') or 'never'}  {state}")


def _tokens_revoke(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        t = admin.revoke_token(args.token_id)
    print(f"token {t['token_id']} ({t['role']} {t['name']!r}) revoked at {t['revoked_at']}")
    return 0
