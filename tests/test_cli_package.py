"""The ``sealedtorch.cli`` package: one module per noun, each registered the same way, and a
parser that builds without importing torch (so ``sealedtorch --help`` stays fast)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import sealedtorch.cli
from sealedtorch import __version__
from sealedtorch.cli import NOUNS


def _cli_modules() -> dict[str, object]:
    names = [m.name for m in pkgutil.iter_modules(sealedtorch.cli.__path__)
             if m.name != "__main__"]
    return {name: importlib.import_module(f"sealedtorch.cli.{name}") for name in names}


def test_every_module_with_a_register_function_is_listed_once_in_nouns():
    with_register = {name for name, mod in _cli_modules().items() if hasattr(mod, "register")}
    listed = [mod.__name__.rpartition(".")[2] for mod in NOUNS]
    assert sorted(listed) == sorted(with_register)
    assert len(listed) == len(set(listed))


def test_the_only_module_that_is_no_noun_is_the_shared_one():
    assert {name for name, mod in _cli_modules().items()
            if not hasattr(mod, "register")} == {"common"}


def test_building_the_parser_does_not_import_torch():
    code = ("import sys; from sealedtorch.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_python_dash_m_sealedtorch_cli_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == f"sealedtorch {__version__}"
