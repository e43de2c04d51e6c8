"""What several ``sealedtorch`` nouns share: the shape of a command, the options that mean
the same thing everywhere, the checks run on what a user typed, and the JSON printer.

Invariants:

* one spelling and one help text per shared option: a helper here adds it, so two
  commands cannot drift apart (docs/cli.md "One spelling per concept");
* every check raises :class:`~sealedtorch.errors.ConfigError` (exit status 2) naming the
  flag to fix, and runs before any work is done (nothing written, nothing fetched);
* nothing heavy is imported at module level: building the parser for ``--help`` must stay
  fast, so clients and libraries are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, KeyFileError

Handler = Callable[[argparse.Namespace], int]
Row = TypeVar("Row")

ENV_URL = "SEALEDTORCH_KEYSERVER"
ENV_CA = "SEALEDTORCH_KEYSERVER_CA"
ENV_TOKEN = "SEALEDTORCH_ADMIN_TOKEN_FILE"  # noqa: S105 (a variable name)
ENV_SOCKET = "SEALEDTORCH_KEYCACHE_SOCKET"

#: ``--tee`` where this machine's TEE is meant (``auto``: detect it).
TEE_CHOICES = ["auto", "sgx", "tdx", "snp", "sim"]

# --------------------------------------------------------------------------- commands


def add_noun(sub: argparse._SubParsersAction, name: str, *, help: str, dest: str,
             description: str | None = None, metavar: str = "COMMAND"
             ) -> argparse._SubParsersAction:
    """A noun that only groups commands (``keyserver``, ``keys``, ``client``...): one of
    its subcommands must be given, so a bare ``sealedtorch keys`` is a usage error."""
    parser = sub.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest=dest, metavar=metavar, required=True)


def add_command(sub: argparse._SubParsersAction, name: str, handler: Handler, *, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A command that runs ``handler(args)``; :func:`sealedtorch.cli.main` turns its return
    value into the exit status."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(handler=handler)
    return parser


def hidden_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str,
                 dest: str, **kwargs: Any) -> None:
    """An old spelling of an option, still accepted (so scripts keep working) but not
    shown in ``--help``: one spelling per concept is what users see."""
    parser.add_argument(*flags, dest=dest, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


# --------------------------------------------------------------------------- options


def add_json_flag(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--json``; without ``help`` the shared text (``COMMON_HELP`` in
    :mod:`sealedtorch.cli`) is filled in."""
    parser.add_argument("--json", action="store_true", help=help)


def add_output_option(parser: argparse.ArgumentParser, *, metavar: str, help: str) -> None:
    """``-o``/``--output`` into ``args.out``, with the old ``--out`` still accepted.  Not
    ``required=`` in argparse (the hidden ``--out`` must satisfy it too): the handler asks
    :func:`required_output`."""
    parser.add_argument("-o", "--output", dest="out", type=Path, metavar=metavar, help=help)
    hidden_alias(parser, "--out", dest="out", type=Path)


def required_output(args: argparse.Namespace, message: str) -> Path:
    """``args.out`` of :func:`add_output_option`, or ConfigError(``message``)."""
    out: Path | None = args.out
    if out is None:
        raise ConfigError(message)
    return out


def add_trust_sim_root(parser: argparse.ArgumentParser) -> None:
    """``--trust-sim-root FILE`` (repeatable) into ``args.sim_root``, for a command that
    verifies evidence; the old ``--sim-root`` still accepted."""
    parser.add_argument("--trust-sim-root", dest="sim_root", type=Path, action="append",
                        default=[], metavar="FILE",
                        help="sim: trust this sim platform's platform.pub (INSECURE, "
                             "development only; repeatable)")
    hidden_alias(parser, "--sim-root", dest="sim_root", type=Path, action="append")


def add_keyserver_options(parser: argparse.ArgumentParser, *, token: bool = True) -> None:
    """``--keyserver``, ``--ca`` and (``token``) ``--token-file``, each defaulting to its
    environment variable; :func:`require` says which one is missing."""
    parser.add_argument("--keyserver", default=os.environ.get(ENV_URL), metavar="URL",
                        help=f"keyserver base URL, e.g. https://127.0.0.1:8443 (${ENV_URL})")
    parser.add_argument("--ca", type=Path, default=os.environ.get(ENV_CA), metavar="FILE",
                        help=f"the keyserver's CA certificate (${ENV_CA})")
    if token:
        parser.add_argument("--token-file", type=Path, default=os.environ.get(ENV_TOKEN),
                            metavar="F", help=f"admin token file (${ENV_TOKEN})")


def default_keycache_socket() -> str:
    """``$SEALEDTORCH_KEYCACHE_SOCKET``, else the standard path: the same socket for
    ``keycache run``/``status`` and ``serve --keycache`` (and the library's client)."""
    from ..keycache.protocol import DEFAULT_SOCKET

    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


# --------------------------------------------------------------------------- checks

_ENV_OF = {"keyserver": ENV_URL, "ca": ENV_CA, "token_file": ENV_TOKEN}


def require(args: argparse.Namespace, *names: str) -> None:
    """Options that have an environment default cannot be ``required=`` in argparse: say
    which is missing, and which variable would do."""
    for name in names:
        if getattr(args, name, None) in (None, ""):
            flag = "--" + name.replace("_", "-")
            env = f" (or set ${_ENV_OF[name]})" if name in _ENV_OF else ""
            raise ConfigError(f"{flag} is required{env}")


def check_https_url(url: str, flag: str) -> str:
    """Every service we talk to is TLS-only: say so up front instead of a protocol error
    from deep inside the HTTP library."""
    if not url.startswith("https://"):
        raise ConfigError(f"{flag}: the URL must start with https:// (got {url!r})")
    return url


def check_model_id(model_id: str, flag: str = "--model-id") -> str:
    """A model id as the CLI user typed it: a clear error naming the flag, not a
    ValueError from deep inside."""
    from ..keys import validate_model_id

    try:
        return validate_model_id(model_id)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def check_output_dir(path: Path, flag: str) -> None:
    """Fail before any work (and before a key file is written) when the output's
    directory does not exist."""
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: the directory {parent} does not exist "
                          f"(create it first: mkdir -p {parent})")


def refuse_existing_output(path: Path, force: bool) -> None:
    """A sealed file is replaced only when asked (``--force``)."""
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to replace)")


def refuse_existing_key_file(path: Path | None) -> None:
    """A key file is never replaced: the old key may be the only copy."""
    if path is not None and path.exists():
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key file")


def parse_metadata(pairs: list[str], json_pairs: list[str]) -> dict[str, Any]:
    """``--metadata K=V`` (strings) and ``--metadata-json K=JSON`` into one mapping."""
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


# --------------------------------------------------------------------------- files, output


def read_bytes_or_empty(path: Path | None) -> bytes:
    """A measured configuration file's bytes (none given: empty, which is measured too)."""
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def read_checkpoint(path: Path | None) -> str | None:
    """A checkpoint saved earlier (``--checkpoint SAVED``), as text; None if not given."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--checkpoint {path}: cannot read it ({exc})") from None


def print_json(doc: Any, *, sort_keys: bool = False) -> None:
    """``--json`` output: one indented JSON document on stdout."""
    print(json.dumps(doc, indent=2, sort_keys=sort_keys))


def print_rows(rows: Sequence[Row], line: Callable[[Row], str], *, as_json: bool,
               doc: Any = None) -> None:
    """A listing: with ``--json`` the rows (or ``doc``, their JSON form) as one document,
    else one line per row."""
    if as_json:
        print_json(rows if doc is None else doc)
        return
    for row in rows:
        print(line(row))


def admin_client(args: argparse.Namespace) -> Any:
    """The keyserver's admin API for ``--keyserver``/``--ca``/``--token-file`` (an
    :class:`~sealedtorch.keyserver.client.AdminClient`, a context manager), after the
    checks that need no network: model id, required options, https."""
    from ..keyserver.client import AdminClient

    if getattr(args, "model_id", None) is not None:
        check_model_id(args.model_id)
    require(args, "keyserver", "token_file")
    check_https_url(args.keyserver, "--keyserver")
    return AdminClient.from_token_file(args.keyserver, args.ca, args.token_file)
