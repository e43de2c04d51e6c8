"""sealedtorch: confidential deployment of PyTorch models.

Public API: :func:`seal`, :func:`load_state_dict`, :func:`load_model`, and the errors in
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
    "KeyUnavailable", "PolicyDenied", "SealedTorchError", "__version__",
]
