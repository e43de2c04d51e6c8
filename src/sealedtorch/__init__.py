"""sealedtorch: confidential deployment of PyTorch models.

Public API, like safetensors' few functions: :func:`seal` (returns a :class:`SealResult`),
:func:`load_state_dict`, :func:`load_model`, :func:`load_pretrained` (Hugging Face
transformers models), :func:`unseal`, :func:`read_preamble`, the key helpers
(:class:`ModelKey`, :func:`read_key_file`, :func:`write_key_file`) and every exception
of :mod:`sealedtorch.errors` (one tree, drawn in its docstring).  Heavy imports (torch)
happen on first use, so the CLI and the services start fast; ``dir(sealedtorch)`` lists
the lazy names too.
"""

from __future__ import annotations

from . import errors
from .errors import *  # noqa: F403 (every exception is public: see errors.__all__)

__version__ = "0.1.0"

#: The functions and types, imported on first use (see ``__getattr__``).
_LAZY_API = ("ModelKey", "SealResult", "load_model", "load_pretrained", "load_state_dict",
             "read_key_file", "read_preamble", "seal", "unseal", "write_key_file")
__all__ = ["__version__", *_LAZY_API, *errors.__all__]

_FROM_FORMAT = frozenset({"seal", "load_state_dict", "load_model", "unseal", "read_preamble",
                          "SealResult"})
_FROM_KEYS = frozenset({"ModelKey", "read_key_file", "write_key_file"})


def __getattr__(name: str) -> object:
    """Lazy public API: importing sealedtorch does not import torch until it is needed."""
    if name in _FROM_FORMAT:
        from . import format as _format

        return getattr(_format, name)
    if name == "load_pretrained":
        from .runtime.hf import load_pretrained

        return load_pretrained
    if name in _FROM_KEYS:
        from . import keys as _keys

        return getattr(_keys, name)
    raise AttributeError(f"module 'sealedtorch' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (the lazy names included), so ``dir()`` and completion show it."""
    return sorted({*__all__, "errors"})
