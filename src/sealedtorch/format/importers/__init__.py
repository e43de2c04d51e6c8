"""Importers: turn model files made by other tools into plaintext state dicts to seal.

Each importer reads its input without running anything from it (``weights_only=True``
loads, our own parsers) and fails with a typed error naming the entry it refuses.
"""

from __future__ import annotations

from .sgx_pytorch import SgxPytorchImport, import_sgx_pytorch

__all__ = ["SgxPytorchImport", "import_sgx_pytorch"]
