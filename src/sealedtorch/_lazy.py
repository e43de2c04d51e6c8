"""Lazy package exports: a package names what it exports and the submodule each lives in,
and the submodule is imported on first access, so importing the package (the CLI, the
services) does not pull in torch, FastAPI or httpx before they are needed.

Invariant: a name is looked up only in the submodule its package maps it to; any other name
is an ordinary :class:`AttributeError`, as for a module without ``__getattr__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["lazy_attribute"]


def lazy_attribute(package: str, where: Mapping[str, str], name: str) -> Any:
    """``name`` from ``package``'s submodule ``where[name]``, for the package's module
    ``__getattr__`` (PEP 562)::

        def __getattr__(name: str) -> Any:
            return lazy_attribute(__name__, _WHERE, name)
    """
    if name in where:
        return getattr(importlib.import_module(f".{where[name]}", package), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
