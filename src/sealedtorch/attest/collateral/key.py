"""The key of a piece of DCAP collateral: (TEE, FMSPC, PCK issuing CA).

Invariant: a :class:`CollateralKey` is always normalised (TEE sgx or tdx, FMSPC 12
upper-case hex digits, CA ``processor`` or ``platform``), so equal keys name the same cache
file and the same PCCS query.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import CollateralError
from ..evidence import Tee

_CA_ISSUER_CN = {"processor": "Intel SGX PCK Processor CA", "platform": "Intel SGX PCK Platform CA"}


@dataclass(frozen=True)
class CollateralKey:
    """What a piece of collateral is for: TEE, platform FMSPC and the PCK issuing CA.

    TCB info depends on (TEE, FMSPC), the QE identity on the TEE, the PCK CRL on the CA.
    """

    tee: Tee
    fmspc: str
    ca: str

    def __post_init__(self) -> None:
        tee = Tee(self.tee)
        if tee not in (Tee.SGX, Tee.TDX):
            raise CollateralError(f"DCAP collateral exists only for sgx and tdx, not {tee}")
        fmspc = str(self.fmspc).upper()
        if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
            raise CollateralError(f"FMSPC must be 12 hex digits, got {self.fmspc!r}")
        ca = str(self.ca).lower()
        if ca not in _CA_ISSUER_CN:
            raise CollateralError(f"PCK CA must be 'processor' or 'platform', got {self.ca!r}")
        object.__setattr__(self, "tee", tee)
        object.__setattr__(self, "fmspc", fmspc)
        object.__setattr__(self, "ca", ca)

    @property
    def filename(self) -> str:
        return f"{self.tee.value}-{self.fmspc}-{self.ca}.json"

    def __str__(self) -> str:
        return f"{self.tee.value} FMSPC {self.fmspc} ({self.ca} CA)"
