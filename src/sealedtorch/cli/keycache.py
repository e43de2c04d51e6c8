"""``sealedtorch keycache run | status``: thin wrappers over :mod:`sealedtorch.keycache`."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import (
    ENV_CA,
    ENV_URL,
    TEE_CHOICES,
    add_command,
    add_json_flag,
    add_noun,
    check_https_url,
    default_keycache_socket,
    print_json,
    read_bytes_or_empty,
)

log = logging.getLogger("sealedtorch.keycache")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``60s``, ``5m``, ``1h``, ``1d`` or a plain number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 500ms, 60s, 5m, 1h, 1d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def register(sub: argparse._SubParsersAction) -> None:
    ksub = add_noun(sub, "keycache", help="hold keys from the keyserver for local runtimes",
                    dest="keycache_command")

    p = add_command(
        ksub, "run", _run, help="attest to the keyserver, fetch keys, serve them on a Unix socket",
        description="Attest to the keyserver as a key holder, fetch every key this TEE may "
                    "hold, keep them in memory only, and release each to local runtimes "
                    "that prove themselves and satisfy the model's policy.  Keeps serving "
                    "through keyserver outages for up to --max-stale.")
    p.add_argument("--keyserver", default=os.environ.get(ENV_URL), metavar="URL",
                   help=f"keyserver base URL (or ${ENV_URL})")
    p.add_argument("--ca", type=Path, default=os.environ.get(ENV_CA), metavar="FILE",
                   help=f"CA certificate that signed the keyserver's TLS certificate "
                        f"(or ${ENV_CA})")
    p.add_argument("--log-key", default=os.environ.get("SEALEDTORCH_KEYSERVER_LOG_KEY"),
                   metavar="VKEY",
                   help="the keyserver's transparency-log verifier key (`keyserver audit "
                        "checkpoint --log-key`; or $SEALEDTORCH_KEYSERVER_LOG_KEY); "
                        "default: pinned on first use")
    p.add_argument("--socket", default=default_keycache_socket(), metavar="PATH",
                   help="Unix socket to serve on (default %(default)s; created 0660 in a "
                        "0750 directory)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group owner of the socket (runtimes' group); default: ours")
    p.add_argument("--tee", default="auto", choices=TEE_CHOICES, help="this TEE (default: detect)")
    p.add_argument("--sim-platform", type=Path, metavar="DIR",
                   help="sim platform directory (or $SEALEDTORCH_SIM_PLATFORM)")
    p.add_argument("--runtime-config", type=Path, metavar="FILE",
                   help="sim: configuration file included in the keycache's measurement")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="keycache configuration (YAML/JSON, e.g. `models: [id, ...]`: the "
                        "only models this keycache holds); its bytes are part of the "
                        "keycache's measurement (`sealedtorch attest measure --raw-config "
                        "FILE`)")
    p.add_argument("--refresh", type=parse_duration, default=60.0, metavar="DURATION",
                   help="refresh interval (default 60s)")
    p.add_argument("--max-stale", type=parse_duration, default=3600.0, metavar="DURATION",
                   help="serve held keys at most this long after the last successful "
                        "refresh (default 1h)")
    p.add_argument("--nonce-ttl", type=parse_duration, default=30.0, metavar="DURATION",
                   help="lifetime of local nonces (default 30s)")
    p.add_argument("--local-proof", choices=["auto", "evidence", "peer"], default="auto",
                   help="how runtimes prove themselves: evidence from their TEE, or (one "
                        "TDX/SNP VM) peer credentials; auto: peer on tdx/snp, else evidence")
    p.add_argument("--trust-sim-root", type=Path, action="append", default=[],
                   metavar="FILE", help="sim: trust runtime evidence from this platform.pub "
                                        "(default: the keycache's own sim platform)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="only serve processes of this uid (repeatable)")
    p.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID",
                   help="only serve processes of this gid (repeatable)")
    p.add_argument("--pccs-url", help="SGX/TDX collateral source for local evidence")
    p.add_argument("--kds-url", help="SEV-SNP VCEK source for local evidence")
    p.add_argument("--cache-dir", type=Path, help="collateral / VCEK cache for local evidence")
    p.add_argument("--log-format", choices=["json", "text"], default="text")

    p = add_command(ksub, "status", _status,
                    help="what a running keycache holds (never key bytes)",
                    description="Print the keys held (model ids, versions, age), the "
                                "last refresh, whether the keyserver is reachable, and "
                                "which runtime (pid, uid, measurement) got which key "
                                "and when.  Exit 0 if serving, 1 if it holds nothing it "
                                "may serve.")
    p.add_argument("--socket", default=default_keycache_socket(), metavar="PATH")
    add_json_flag(p, help="machine-readable output")


def build(args: argparse.Namespace) -> Any:
    """The :class:`~sealedtorch.keycache.service.Keycache` that ``keycache run`` serves."""
    return build_with_signer(args)[0]


def build_with_signer(args: argparse.Namespace) -> tuple[Any, Any]:
    """The keycache and its :class:`~sealedtorch.keycache.local.AnswerSigner` (which proves
    to runtimes, with this TEE's evidence, that the answers come from this keycache)."""
    from ..attest import Tee, VerifierConfig
    from ..attest.attesters import get_attester
    from ..attest.sim import load_platform_keys
    from ..keycache.config import ListedModels, load_keycache_config
    from ..keycache.local import AnswerSigner, EvidenceAppraiser, PeerAppraiser, self_claims
    from ..keycache.service import Keycache
    from ..keycache.upstream import KeyserverUpstream

    if not args.keyserver:
        raise ConfigError(f"--keyserver URL is required (or set ${ENV_URL})")
    check_https_url(args.keyserver, "--keyserver")
    if args.keyserver.startswith("https://") and args.ca is None:
        raise ConfigError(f"--ca FILE is required (or set ${ENV_CA}): the keyserver's TLS CA "
                          "certificate, tls/ca.pem in its data directory")
    config_path = getattr(args, "config", None)
    if config_path is not None and args.runtime_config is not None:
        raise ConfigError("give --config or --runtime-config, not both: each is the "
                          "configuration input of the keycache's measurement")
    measured = read_bytes_or_empty(config_path if config_path is not None else args.runtime_config)
    kc_config = load_keycache_config(measured if config_path is not None else {})
    attester = get_attester(args.tee, sim_platform=args.sim_platform,
                            runtime_config=measured)
    tee = Tee(attester.tee)
    roots = load_platform_keys(args.trust_sim_root)
    if tee is Tee.SIM and not roots and attester.platform is not None:
        roots = (attester.platform.public_key,)  # runtimes share this host's sim platform
    verifier = VerifierConfig(sim_platform_keys=roots, pccs_url=args.pccs_url,
                              kds_url=args.kds_url, cache_dir=args.cache_dir)
    proof = args.local_proof
    if proof == "auto":
        proof = "peer" if tee in (Tee.TDX, Tee.SNP) else "evidence"
    appraiser: Any
    if proof == "peer":
        if tee not in (Tee.TDX, Tee.SNP, Tee.SIM):
            raise ConfigError(f"--local-proof peer is for one TDX or SEV-SNP VM, not {tee}")
        if not args.allow_uid and not args.allow_gid:
            raise ConfigError("--local-proof peer needs --allow-uid and/or --allow-gid: "
                              "inside one VM the kernel's peer credentials are what tells "
                              "runtimes apart")
        appraiser = PeerAppraiser(self_claims(attester, verifier),
                                  allowed_uids=args.allow_uid, allowed_gids=args.allow_gid)
    else:
        appraiser = EvidenceAppraiser(verifier, tees=[tee], allowed_uids=args.allow_uid,
                                      allowed_gids=args.allow_gid)
    upstream: Any = KeyserverUpstream.connect(args.keyserver, ca=args.ca,
                                              attester=attester, log_key=args.log_key)
    if kc_config.models is not None:
        upstream = ListedModels(upstream, kc_config)
    else:
        log.warning("keycache: no `models` list in a measured --config: this keycache holds "
                    "every key the keyserver releases to it")
    keycache = Keycache(upstream, appraiser, refresh=args.refresh, max_stale=args.max_stale,
                        nonce_ttl=args.nonce_ttl)
    return keycache, AnswerSigner(attester)


def _run(args: argparse.Namespace) -> int:
    from ..keycache.server import KeycacheServer, bind_unix_socket, harden_process
    from ..logs import configure_logging

    configure_logging(args.log_format)
    harden_process()
    group = None
    if args.socket_group is not None:
        try:
            group = int(args.socket_group) if args.socket_group.isdigit() else \
                grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"--socket-group: no group {args.socket_group!r}") from None
    # SIGHUP means "refresh now" once serving; until the server installs that handler a
    # SIGHUP (a supervisor or test reacting to the socket appearing) must not kill us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # the socket first: one in use must fail before we attest and fetch (and the
    # keyserver audits) a single key
    sock = bind_unix_socket(args.socket, group=group)
    try:
        keycache, signer = build_with_signer(args)
    except BaseException:
        sock.close()
        Path(args.socket).unlink(missing_ok=True)
        raise
    server = KeycacheServer(keycache, args.socket, group=group, sock=sock,
                            signer=signer)
    keycache.start()
    try:
        server.serve()
    finally:
        keycache.stop()
    return 0


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_status(socket_path: str, st: dict[str, Any]) -> str:
    refresh = st.get("refresh", {})
    reachable = st.get("keyserver_reachable")
    state = "serving" if st.get("serving") else ("STALE, not serving" if st.get("stale")
                                                 else "not serving (no keys fetched yet)")
    ks = {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}[reachable]
    lines = [f"keycache {socket_path}: {state}; keyserver {ks}"]
    upstream = st.get("keyserver") or {}
    if upstream.get("url"):
        renew = upstream.get("token_renews_in_s")
        lines.append(f"keyserver: {upstream['url']}" + (
            f" (attestation token renews in {_ago(max(0.0, renew))})"
            if isinstance(renew, int | float) else ""))
    age = refresh.get("last_ok_age_s")
    lines.append(f"last refresh: {_ago(age)}{' ago' if age is not None else ''} "
                 f"(every {refresh.get('interval_s', 0):g} s, max-stale "
                 f"{refresh.get('max_stale_s', 0):g} s, next in "
                 f"{_ago(refresh.get('next_attempt_in_s'))})")
    if refresh.get("last_error"):
        lines.append(f"last error: {refresh['last_error']} "
                     f"({refresh.get('consecutive_failures', 0)} failure(s) in a row)")
    keys = st.get("keys", [])
    lines.append(f"keys held: {len(keys)}")
    if keys:
        width = max(len("MODEL"), *(len(k["model_id"]) for k in keys))
        lines.append(f"  {'MODEL':<{width}}  VERSION  LATEST  AGE      POLICY")
        for k in keys:
            lines.append(f"  {k['model_id']:<{width}}  {k['version']:<7}  "
                         f"{'yes' if k['latest'] else 'no':<6}  {_ago(k['age_s']):<7}  "
                         f"{k['policy_digest'][:16]}")
    local = st.get("local", {})
    lines.append(f"local: proof by {local.get('mode')}, {local.get('released', 0)} released, "
                 f"{local.get('refused', 0)} refused")
    releases = st.get("releases") or []
    if releases:
        lines.append("released to:")
        lines += format_releases(releases)
    return "\n".join(lines)


def _iso(t: float | None) -> str:
    import datetime

    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(float(t), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def format_releases(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (model version, runtime): who (pid, uid, measurement) got it, when."""
    width = max(len("MODEL"), *(len(f"{r['model_id']} v{r['version']}") for r in rows))
    out = [f"  {'MODEL':<{width}}  {'PID':>7}  {'UID':>6}  TEE  {'MEASUREMENT':<16}  "
           f"{'LAST':<20}  COUNT"]
    for r in rows:
        what = f"{r['model_id']} v{r['version']}"
        meas = (r.get("measurement") or "-")[:16]
        pid = "-" if r.get("pid") is None else str(r["pid"])
        uid = "-" if r.get("uid") is None else str(r["uid"])
        out.append(f"  {what:<{width}}  {pid:>7}  {uid:>6}  {r.get('tee') or '-':<3}  "
                   f"{meas:<16}  {_iso(r.get('last_at')):<20}  {r.get('count', 0)}")
    return out


def _status(args: argparse.Namespace) -> int:
    from ..keycache.client import KeycacheClient

    with KeycacheClient(args.socket, timeout=5.0) as client:
        st = client.status()
    if args.json:
        print_json(st)
    else:
        print(format_status(args.socket, st))
    return 0 if st.get("serving") else 1
