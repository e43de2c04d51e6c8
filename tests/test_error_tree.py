"""The one exception tree: every exception sealedtorch raises on purpose is a class in
sealedtorch/errors.py, drawn in that module's docstring, re-exported by the package, and
declares what a service answers with it (no status or reason attached afterwards)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import sealedtorch
from sealedtorch import errors

SRC = Path(sealedtorch.__file__).parent
_BUILTIN_BASES = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError",
                  "SSLError", "KeyError", "TypeError", "LookupError"}


def _tree_classes() -> list[type[errors.SealedTorchError]]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, errors.SealedTorchError)]


def test_no_module_but_errors_py_defines_an_exception_class():
    strays = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                     for b in node.bases}
            if bases & (_BUILTIN_BASES | set(errors.__all__)):
                strays.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not strays, "exception classes outside errors.py: " + ", ".join(strays)


def test_every_subclass_of_the_base_lives_in_errors_py():
    for info in pkgutil.walk_packages(sealedtorch.__path__, "sealedtorch."):
        if not info.name.endswith(".__main__"):  # that one runs the command
            importlib.import_module(info.name)
    seen, todo = set(), [errors.SealedTorchError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo.extend(c for c in cls.__subclasses__() if c not in seen)
    ours = {c.__module__ for c in seen if c.__module__.startswith("sealedtorch.")}
    assert ours == {"sealedtorch.errors"}  # (tests may define stand-ins of their own)


@pytest.mark.parametrize("cls", _tree_classes(), ids=lambda c: c.__name__)
def test_each_class_is_drawn_in_the_tree_exported_and_declares_its_answer(cls):
    assert f" {cls.__name__}" in errors.__doc__
    assert cls.__name__ in errors.__all__ and getattr(sealedtorch, cls.__name__) is cls
    assert isinstance(cls.problem_type, str) and cls.problem_type
    assert 400 <= cls.http_status <= 599 and isinstance(cls.transient, bool)


def test_context_is_given_to_the_constructor_not_attached_later():
    exc = errors.KeyUnavailable("gone", http_status=410, retry_after=2.5,
                                audit_reasons=["revoked by the owner"])
    assert (exc.http_status, exc.retry_after, exc.audit_reasons) == \
        (410, 2.5, ("revoked by the owner",))
    assert errors.KeyUnavailable("no key").http_status == 404  # the class's default


def test_a_pin_mismatch_is_both_a_binding_error_and_an_ssl_error():
    import ssl

    exc = errors.PinMismatch("the server presented another key")
    assert isinstance(exc, errors.BindingError) and isinstance(exc, ssl.SSLError)
    assert str(exc) == "the server presented another key"
