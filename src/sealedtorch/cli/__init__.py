"""The ``sealedtorch`` command.  Thin: it parses arguments and calls the modules.

One module of this package per noun (``format``: seal, unseal, inspect, demo; ``attest``:
attest, sim; ``keyserver``; ``keys``; ``keycache``; ``runtime``: serve, client;
``importer``: import; ``audit``; ``manifest``), each with ``register(sub)``, all listed in
:data:`NOUNS`; what they share is in :mod:`.common`.  Handlers import what they use
(torch, clients) when they run, so ``sealedtorch --help`` stays fast.

Every :class:`~sealedtorch.errors.SealedTorchError` becomes a one-line message on stderr
and exit status 2 (1 is reserved for "ran fine, answer is no", e.g. a policy denial).

Exit statuses (``EXIT_CODES``; docs/cli.md has the table, a test checks it):

==== ======================================================================================
0    success (also: the reader of our output went away, e.g. ``inspect ... | head``)
1    ran fine, the answer is no: a policy denial, a broken audit chain, a keycache that
     holds nothing it may serve, keys still under an old KEK after ``rewrap``
2    error: bad usage or input, an unreachable or refusing service, a port in use
130  interrupted (Ctrl-C)
==== ======================================================================================
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Protocol

from .. import __version__
from ..errors import PolicyDenied, SealedTorchError
from . import attest, audit, format, importer, keycache, keys, keyserver, manifest, runtime
from .common import Handler

#: Exit status -> meaning; the documented table (docs/cli.md) is tested against it.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "ran fine, the answer is no (policy denial, broken audit chain, nothing served)",
    2: "error (bad usage or input, service unreachable or refusing, address in use)",
    130: "interrupted",
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` unless the text already names it (and
    never "(default: None)" or "(default: False)", which say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.help is argparse.SUPPRESS or "default" in text.lower():
            return action.help
        default = action.default
        if default is None or default is False or default == [] or \
                default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        if isinstance(default, float) and default.is_integer():
            return f"{text} (default: {default:g})"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults shown in ``--help``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class Noun(Protocol):
    """A module of this package that adds one noun's commands to the top-level parser."""

    def register(self, sub: argparse._SubParsersAction) -> None: ...


#: Every noun, registered the same way and in this order (the order of ``--help``).
NOUNS: tuple[Noun, ...] = (format, attest, keyserver, keys, keycache, runtime, importer,
                           audit, manifest)


#: Help for options many commands share, filled in where a command gave none (so every
#: option has help text without repeating it in each module).
COMMON_HELP: dict[str, str] = {
    "--data": "the keyserver's data directory (made by `keyserver init`)",
    "--json": "print the result as JSON on stdout (for scripts)",
    "--quiet": "print less",
    "--keyserver": "keyserver base URL, https://HOST:PORT",
    "--ca": "the keyserver's CA certificate (tls/ca.pem in its data directory)",
    "--token-file": "admin/owner token file",
    "--model-id": "the model id",
    "--version": "the key version",
    "--output": "the file to write",
    "--input": "the file to read",
    "--tee": "which TEE: sgx, tdx, snp or sim (the insecure software TEE); auto: detect",
    "--policy": "policy file (YAML or JSON)",
    "--log-format": "log lines on stderr: one JSON object each, or text",
    "--socket": "the keycache's Unix socket ($SEALEDTORCH_KEYCACHE_SOCKET)",
    "--role": "which role",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                _fill_help(choice)
        elif action.help is None:
            for flag in action.option_strings:
                if flag in COMMON_HELP:
                    action.help = COMMON_HELP[flag]
                    break


def iter_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser with its command path, e.g. ``("keys", "rotate")``."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, choice in action.choices.items():
                found += iter_parsers(choice, (*path, name))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sealedtorch",
        description="Confidential deployment of PyTorch models: seal weights, release keys "
                    "only to attested TEEs, decrypt only inside them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sealedtorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for noun in NOUNS:
        noun.register(sub)
    _fill_help(parser)
    return parser


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(text: object) -> str:
    """Error texts end up in terminals and log lines: one line, no control characters."""
    return " ".join(_ANSI.sub("", str(text)).split())


def _quiet_stdout() -> None:
    """The reader of our stdout went away (``| head``): that is not an error.  Point
    stdout at /dev/null so that the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        rc = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except PolicyDenied as exc:
        print(f"sealedtorch: denied: {_one_line(exc)}", file=sys.stderr)
        return 1
    except SealedTorchError as exc:
        print(f"sealedtorch: error ({type(exc).__name__}): {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or socket problem no module turned into a typed error
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sealedtorch: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sealedtorch: interrupted", file=sys.stderr)
        return 130
