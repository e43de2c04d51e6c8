"""The ``sealedtorch`` command.  Thin: it parses arguments and calls the modules.

Every :class:`~sealedtorch.errors.SealedTorchError` becomes a one-line message on stderr
and exit status 2 (1 is reserved for "ran fine, answer is no", e.g. a policy denial).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import PolicyDenied, SealedTorchError

Handler = Callable[[argparse.Namespace], int]


def _add_format_commands(sub: argparse._SubParsersAction) -> None:
    from . import cli_format

    cli_format.register(sub)


def _add_attest_commands(sub: argparse._SubParsersAction) -> None:
    from . import cli_attest

    cli_attest.register(sub)


_GROUPS = [_add_format_commands, _add_attest_commands]
_GROUPS.append(lambda sub: __import__("sealedtorch.cli_keyserver").cli_keyserver.register(sub))
_GROUPS.append(lambda sub: __import__("sealedtorch.cli_keycache").cli_keycache.register(sub))
_GROUPS.append(lambda sub: __import__("sealedtorch.cli_runtime").cli_runtime.register(sub))
_GROUPS.append(lambda sub: __import__("sealedtorch.cli_manifest").cli_manifest.register(sub))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealedtorch",
        description="Confidential deployment of PyTorch models: seal weights, release keys "
                    "only to attested TEEs, decrypt only inside them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sealedtorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _GROUPS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except PolicyDenied as exc:
        print(f"sealedtorch: denied: {exc}", file=sys.stderr)
        return 1
    except SealedTorchError as exc:
        print(f"sealedtorch: error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sealedtorch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
