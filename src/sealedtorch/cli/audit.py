"""``sealedtorch audit {checkpoint,verify,list}``: the auditor's side of the transparency log,
over the keyserver's API (any admin token: admin, auditor or owner).

Why a separate noun: an auditor or a model owner witnessing the log has no access to the
keyserver's data directory or database; what they keep is *checkpoints*, saved somewhere
the keyserver's operators cannot write, and what they need is a check that today's log
still extends them.  ``--log-key`` pins the log's verifier key (get it once, out of band,
from ``keyserver audit checkpoint --log-key``); without it the key the server names is used
and a warning says so.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from .. import crypto
from ..errors import ConfigError, TransparencyError
from .common import (
    add_command,
    add_json_flag,
    add_keyserver_options,
    add_noun,
    admin_client,
    read_checkpoint,
)


def register(sub: argparse._SubParsersAction) -> None:
    asub = add_noun(sub, "audit", help="witness a keyserver's transparency log (auditor)",
                    dest="audit_command",
                    description="Read and check a keyserver's transparency log "
                                "over its API with an admin, auditor or owner token.")

    p = add_command(asub, "checkpoint", _checkpoint,
                    help="print (and save) the current signed checkpoint")
    add_keyserver_options(p)
    _log_key_arg(p)
    p.add_argument("--save", type=Path, metavar="FILE", help="also write it to FILE")

    p = add_command(asub, "verify", _verify,
                    help="prove the log extends a saved checkpoint; exit 1 if history was "
                         "rewritten or truncated",
                    description="Fetch the current checkpoint and a consistency proof "
                                "from the SAVED one's size, and verify both; with "
                                "--expect-head, also prove that record SEQ with chain "
                                "hash HASH is in the signed log.")
    add_keyserver_options(p)
    _log_key_arg(p)
    p.add_argument("--checkpoint", type=Path, metavar="SAVED",
                   help="a checkpoint saved earlier (`audit checkpoint --save`)")
    p.add_argument("--expect-head", metavar="SEQ:HASH",
                   help="a chain head noted earlier (`keyserver audit verify` prints it)")
    p.add_argument("--save", type=Path, metavar="FILE",
                   help="after a successful check, write the current checkpoint to FILE")

    p = add_command(asub, "list", _list, help="audit records, newest first")
    add_keyserver_options(p)
    p.add_argument("--model", metavar="ID", help="only records about this model")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--oldest-first", action="store_true", help="chain order instead")
    add_json_flag(p, help="one JSON record per line")


def _log_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-key", metavar="VKEY",
                   help="the log's verifier key (name+id+key), pinned; default: the key "
                        "the server names (a warning says so)")


def _verifier(args: argparse.Namespace, offered: str) -> Any:
    from ..keyserver import tlog

    if args.log_key:
        return tlog.Verifier.parse(args.log_key)
    print(f"warning: log key not pinned (--log-key); using the one the server names: "
          f"{offered}", file=sys.stderr)
    return tlog.Verifier.parse(offered)


def _current(admin: Any, args: argparse.Namespace) -> tuple[Any, str, Any]:
    from ..keyserver import tlog

    answer = admin.checkpoint()
    note, offered = answer.get("checkpoint"), answer.get("log_key")
    if not isinstance(note, str) or not isinstance(offered, str):
        raise TransparencyError("the keyserver's checkpoint answer is malformed")
    verifier = _verifier(args, offered)
    return tlog.open_checkpoint(note, verifier), note, verifier


def _save(path: Path | None, note: str) -> None:
    if path is not None:
        try:
            path.write_text(note, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--save {path}: {exc.strerror}") from None


def _checkpoint(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        _, note, _ = _current(admin, args)
    sys.stdout.write(note)
    _save(args.save, note)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..keyserver import protocol, tlog

    saved_note = read_checkpoint(args.checkpoint)
    with admin_client(args) as admin:
        cp, note, verifier = _current(admin, args)
        print(f"current checkpoint: {cp.size} leaves, root {base64.b64encode(cp.root).decode()}"
              f" (signature of {verifier.name} verified)")
        if saved_note is not None:
            saved = tlog.open_checkpoint(saved_note, verifier)
            if saved.size > cp.size:
                print(f"log TRUNCATED: the saved checkpoint has {saved.size} leaves, the log "
                      f"now {cp.size}", file=sys.stderr)
                return 1
            proof = admin.consistency_proof(saved.size, cp.size)
            try:
                tlog.verify_consistency(saved.size, cp.size, saved.root, cp.root,
                                        tlog.decode_hashes(proof.get("proof"),
                                                           what="consistency proof"))
            except TransparencyError as exc:
                print(f"log history REWRITTEN: {exc}", file=sys.stderr)
                return 1
            print(f"consistent with the saved checkpoint of {saved.size} leaves")
        if args.expect_head:
            seq, _, want = args.expect_head.partition(":")
            if not seq.isdigit() or int(seq) < 1 or len(want) != 64:
                raise ConfigError("--expect-head: expected SEQ:HASH (a record number and its "
                                  "64-hex chain hash)")
            index = int(seq) - 1
            if index >= cp.size:
                print(f"record #{seq} is not in the log ({cp.size} leaves): TRUNCATED",
                      file=sys.stderr)
                return 1
            records = admin.audit(after_seq=index, limit=1)["records"]
            rec = records[0] if records else {}
            if rec.get("seq") != int(seq) or rec.get("hash") != want:
                print(f"record #{seq} is not the expected head (chain hash "
                      f"{rec.get('hash')!r}, expected {want})", file=sys.stderr)
                return 1
            body = {k: v for k, v in rec.items() if k != "hash"}
            leaf = crypto.merkle_leaf_hash(protocol.canonical_json(body))
            proof = admin.inclusion_proof(index, cp.size)
            try:
                tlog.verify_inclusion(index, cp.size, leaf,
                                      tlog.decode_hashes(proof.get("proof"),
                                                         what="inclusion proof"), cp.root)
            except TransparencyError as exc:
                print(f"record #{seq} is not in the signed log: {exc}", file=sys.stderr)
                return 1
            print(f"record #{seq} (head {want[:16]}…) is in the signed log")
    _save(args.save, note)
    return 0


def _list(args: argparse.Namespace) -> int:
    limit = max(1, int(args.limit))
    with admin_client(args) as admin:
        if args.oldest_first:
            records = admin.audit(model_id=args.model, limit=limit)["records"]
        elif args.model is None:
            size = admin.checkpoint()["size"]
            records = admin.audit(after_seq=max(0, int(size) - limit), limit=limit)["records"]
            records.reverse()
        else:  # filtered: page through, keep the newest
            records, after = [], 0
            while True:
                page = admin.audit(model_id=args.model, after_seq=after,
                                   limit=10_000)["records"]
                records = (records + page)[-limit:]
                if len(page) < 10_000:
                    break
                after = page[-1]["seq"]
            records.reverse()
    for rec in records:
        if args.json:
            print(json.dumps(rec, sort_keys=True))
            continue
        what = rec.get("model_id") or "-"
        if rec.get("version") is not None:
            what += f" v{rec['version']}"
        who = rec.get("actor") or rec.get("client") or "-"
        print(f"#{rec['seq']:<6} {rec.get('iso_time', '')}  {rec['event']:<14} "
              f"{rec['decision']:<6} {what}  {who}")
    return 0
