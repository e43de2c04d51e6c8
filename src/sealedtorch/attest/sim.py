"""The software TEE ("sim"): a development platform whose evidence proves nothing about hardware.

A *sim platform* is an Ed25519 key pair in a directory (``platform.key``, ``platform.pub``).
Its evidence is a fixed-size binary statement signed by the platform key (layout below and in
``docs/tee-sim.md``).  A verifier accepts it only when the relying party has explicitly listed
that platform's public key in :attr:`VerifierConfig.sim_platform_keys`, and every accepted
statement is logged as insecure.

Statement layout (all integers big-endian), 224 bytes in total::

    off  len  field
      0    8  magic         b"STSIMEV\\x00"
      8    2  version       1
     10    2  flags         bit 0 = debug; bits 1-15 must be 0
     12    4  svn           unsigned
     16   48  measurement   SHA-384 (see sealedtorch.attest.measure)
     64   64  report_data
    128   32  platform_key  raw Ed25519 public key
    160   64  signature     Ed25519 over SIGNING_DOMAIN ‖ bytes[0:160]
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import crypto, secretfile
from ..errors import AttestationError, ConfigError, KeyFileError
from .binding import REPORT_DATA_SIZE
from .evidence import Evidence, SimClaims, Tee

if TYPE_CHECKING:
    from . import VerifierConfig

__all__ = [
    "ENV_PLATFORM", "EVIDENCE_SIZE", "SimPlatform", "decode", "init_platform",
    "platform_dir", "verify",
]

log = logging.getLogger("sealedtorch.attest.sim")

#: Environment variable naming the sim platform directory when none is given explicitly.
ENV_PLATFORM = "SEALEDTORCH_SIM_PLATFORM"
KEY_FILE = "platform.key"
PUB_FILE = "platform.pub"

MAGIC = b"STSIMEV\x00"
VERSION = 1
SIGNING_DOMAIN = b"sealedtorch/sim-evidence/v1\x00"
FLAG_DEBUG = 0x0001
MEASUREMENT_SIZE = 48
SIGNATURE_SIZE = 64
_BODY = struct.Struct(">8sHHI48s64s32s")
BODY_SIZE = _BODY.size  # 160
EVIDENCE_SIZE = BODY_SIZE + SIGNATURE_SIZE  # 224
_SVN_MAX = 2**32 - 1


# --- the platform ----------------------------------------------------------------------

@dataclass(frozen=True)
class SimPlatform:
    """A sim platform loaded from its directory; signs sim evidence."""

    directory: Path
    signing_key: crypto.SigningKey = field(repr=False)

    @classmethod
    def load(cls, directory: Path | str) -> SimPlatform:
        """Load ``platform.key`` from ``directory``; check ``platform.pub`` matches if present."""
        directory = Path(directory)
        key_path = directory / KEY_FILE
        try:
            pem = key_path.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(
                f"no sim platform key at {key_path}: create one with init_platform() "
                f"(`sealedtorch sim init`)") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read sim platform key {key_path}: {exc}") from None
        try:
            key = crypto.SigningKey.from_pem(pem)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"{key_path} is not an unencrypted Ed25519 private key in PEM: {exc}") from None
        pub_path = directory / PUB_FILE
        if pub_path.exists():
            try:
                pub = crypto.load_ed25519_public(pub_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise KeyFileError(f"cannot read sim platform public key {pub_path}: {exc}") \
                    from None
            if pub != key.public_bytes:
                raise KeyFileError(
                    f"{pub_path} does not belong to {key_path}: the public key file was "
                    f"replaced or the directory mixes two platforms")
        return cls(directory, key)

    @classmethod
    def discover(cls, directory: Path | str | None = None) -> SimPlatform:
        """Load the platform from ``directory``, else from ``$SEALEDTORCH_SIM_PLATFORM``."""
        return cls.load(platform_dir(directory))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key (what a relying party lists as trusted)."""
        return self.signing_key.public_bytes

    def sign_evidence(self, report_data: bytes, *, measurement: bytes, debug: bool = False,
                      svn: int = 0) -> Evidence:
        """Produce signed sim evidence for ``report_data`` (exactly 64 bytes)."""
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, "
                             f"got {len(report_data)}")
        if len(measurement) != MEASUREMENT_SIZE:
            raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes (SHA-384), "
                             f"got {len(measurement)}")
        if not 0 <= svn <= _SVN_MAX:
            raise ValueError("svn must fit in an unsigned 32-bit integer")
        body = _BODY.pack(MAGIC, VERSION, FLAG_DEBUG if debug else 0, svn,
                          bytes(measurement), bytes(report_data), self.public_key)
        signature = self.signing_key.sign(SIGNING_DOMAIN + body)
        return Evidence(tee=Tee.SIM, data=body + signature)


def init_platform(out_dir: Path | str) -> SimPlatform:
    """Create a sim platform in ``out_dir``: ``platform.key`` (0600) and ``platform.pub``.

    The directory is created with mode 0700 if missing.  An existing ``platform.key`` is never
    overwritten (:class:`KeyFileError`).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create sim platform directory {out_dir}: {exc}") from None
    key = crypto.SigningKey.generate()
    key_path = out_dir / KEY_FILE
    secretfile.write_new(key_path, key.to_pem(),
                         what="a sim platform key (remove it first if you really mean to "
                              "replace the platform)")
    try:
        (out_dir / PUB_FILE).write_bytes(key.public_pem())
    except OSError as exc:
        raise KeyFileError(f"cannot write {out_dir / PUB_FILE}: {exc}") from None
    return SimPlatform(out_dir, key)


def load_platform_keys(paths: Sequence[str | os.PathLike[str]]) -> tuple[bytes, ...]:
    """Raw Ed25519 keys from sim platforms' ``platform.pub`` files: what a relying party
    passes as ``VerifierConfig.sim_platform_keys`` (``--trust-sim-root``, ``--sim-root``)."""
    keys = []
    for p in paths:
        try:
            keys.append(crypto.load_ed25519_public(Path(p).read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read sim platform key {p}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    return tuple(keys)


def platform_dir(directory: Path | str | None = None) -> Path:
    """The sim platform directory: ``directory`` if given, else ``$SEALEDTORCH_SIM_PLATFORM``."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(ENV_PLATFORM)
    if env:
        return Path(env)
    raise ConfigError(
        f"no sim platform configured: pass --sim-platform DIR or set ${ENV_PLATFORM} "
        f"(create one with `sealedtorch sim init --output DIR`)")


# --- the verifier ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Statement:
    flags: int
    svn: int
    measurement: bytes
    report_data: bytes
    platform_key: bytes
    body: bytes
    signature: bytes


def decode(data: bytes) -> _Statement:
    """Parse (without checking the signature or trust) a sim statement."""
    if len(data) != EVIDENCE_SIZE:
        raise AttestationError(
            f"sim evidence must be exactly {EVIDENCE_SIZE} bytes, got {len(data)}")
    data = bytes(data)
    magic, version, flags, svn, measurement, report_data, platform_key = \
        _BODY.unpack_from(data)
    if magic != MAGIC:
        raise AttestationError("sim evidence: bad magic (not a sealedtorch sim statement)")
    if version != VERSION:
        raise AttestationError(
            f"sim evidence: unsupported format version {version} (this verifier knows "
            f"{VERSION})")
    if flags & ~FLAG_DEBUG:
        raise AttestationError(f"sim evidence: reserved flag bits set (flags=0x{flags:04x})")
    return _Statement(flags, svn, measurement, report_data, platform_key,
                      data[:BODY_SIZE], data[BODY_SIZE:])


def verify(evidence: Evidence, *, at: int, config: VerifierConfig) -> SimClaims:
    """Appraise sim evidence.  ``at`` is unused: sim statements carry no time; freshness comes
    from the nonce bound into report_data."""
    del at
    if evidence.tee != Tee.SIM:
        raise AttestationError(f"sim verifier given {evidence.tee} evidence")
    st = decode(evidence.data)
    refused = "sim evidence is refused unless the relying party trusts that sim platform key"
    if not config.sim_platform_keys:
        raise AttestationError(
            f"{refused}, and this relying party trusts no sim platform key: give it the "
            f"platform's platform.pub with --trust-sim-root FILE; the evidence names key "
            f"{st.platform_key.hex()}")
    if st.platform_key not in config.sim_platform_keys:
        raise AttestationError(
            f"{refused}: it names sim platform key {st.platform_key.hex()}, which is not "
            f"among the {len(config.sim_platform_keys)} this relying party trusts")
    crypto.require_ed25519(st.platform_key, st.signature, SIGNING_DOMAIN + st.body,
                           what="sim evidence (statement modified or not signed by its "
                                "platform key)")
    debug = bool(st.flags & FLAG_DEBUG)
    log.warning(
        "accepted INSECURE sim evidence (software-only TEE, proves nothing about hardware; "
        "never use in production) from sim platform key %s, debug=%s", st.platform_key.hex(),
        debug)
    return SimClaims(
        tee=Tee.SIM, report_data=st.report_data, debug=debug, tcb_status=None,
        insecure=True, measurement=st.measurement, svn=st.svn, platform_key=st.platform_key)
