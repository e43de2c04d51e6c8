"""sealedtorch: confidential deployment of PyTorch models.

Public API: :func:`seal`, :func:`load_state_dict`, :func:`load_model`,
:func:`load_pretrained` (Hugging Face transformers models), and the errors in
:mod:`sealedtorch.errors`.  Heavy imports (torch) happen on first use, so the CLI and the
services start fast.
"""

from __future__ import annotations

from .errors import (
    AttestationError,
    ConfigError,
    FormatError,
    IntegrityError,
    KeyFileError,
    KeyUnavailable,
    PolicyDenied,
    SealedTorchError,
)

__version__ = "0.1.0"

__all__ = [
    "AttestationError", "ConfigError", "FormatError", "IntegrityError", "KeyFileError",
    "KeyUnavailable", "ModelKey", "PolicyDenied", "SealedTorchError", "__version__",
    "load_model", "load_pretrained", "load_state_dict", "read_key_file", "read_preamble",
    "seal", "unseal",
    "write_key_file",
]


def __getattr__(name: str) -> object:
    """Lazy public API: importing sealedtorch does not import torch until it is needed."""
    if name in {"seal", "load_state_dict", "load_model", "unseal", "read_preamble"}:
        from . import format as _format

        return getattr(_format, name)
    if name == "load_pretrained":
        from .runtime.hf import load_pretrained

        return load_pretrained
    if name in {"ModelKey", "read_key_file", "write_key_file"}:
        from . import keys as _keys

        return getattr(_keys, name)
    raise AttributeError(f"module 'sealedtorch' has no attribute {name!r}")
