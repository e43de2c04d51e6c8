"""Attesters: evidence producers, one per TEE, behind one small protocol.

An attester runs inside the TEE and turns 64 bytes of report_data (see
:mod:`sealedtorch.attest.binding`) into :class:`Evidence`:

- :class:`GramineSgxAttester` — SGX under Gramine, through its ``/dev/attestation`` files;
- :class:`ConfigfsTsmAttester` — TDX and SEV-SNP guests, through the Linux configfs-tsm
  report interface (``/sys/kernel/config/tsm/report``);
- :class:`SimAttester` — the software sim TEE (insecure, for development).

:func:`detect` picks one automatically; :func:`get_attester` picks by name.  The hardware
attesters are written against the documented kernel/Gramine interfaces and tested against
imitation directory trees only (see ``docs/attesters.md``).
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import AttestationError, ConfigError
from . import measure
from .binding import REPORT_DATA_SIZE
from .evidence import Evidence, Tee
from .sim import SimPlatform, platform_dir

__all__ = [
    "DEFAULT_SGX_ROOT", "DEFAULT_TSM_ROOT", "Attester", "ConfigfsTsmAttester",
    "GramineSgxAttester", "SimAttester", "detect", "get_attester", "tsm_provider",
]

log = logging.getLogger("sealedtorch.attest.attesters")

DEFAULT_SGX_ROOT = "/dev/attestation"
DEFAULT_TSM_ROOT = "/sys/kernel/config/tsm/report"
SNP_REPORT_SIZE = 1184
TSM_PROVIDERS = {Tee.TDX: "tdx_guest", Tee.SNP: "sev_guest"}


@runtime_checkable
class Attester(Protocol):
    """Produces evidence from inside one TEE.

    ``platform`` is the local sim platform whose key signs the evidence (a relying party on
    the same host may choose to trust its public key); None for the hardware TEEs, whose
    signing keys live in the CPU and are vouched for by the vendor's certificate chain."""

    tee: Tee

    @property
    def platform(self) -> SimPlatform | None:
        """The sim platform that signs this attester's evidence, or None (hardware)."""
        ...

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence binding ``report_data`` (exactly 64 bytes)."""
        ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise TypeError("report_data must be bytes")
    data = bytes(report_data)
    if len(data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, "
                         f"got {len(data)}")
    return data


# --- where report_data sits in the raw evidence ------------------------------------------
# Used to check that the evidence we got back really carries our report_data (and not that of
# a concurrent request), before anyone else sees it.  Offsets per Intel's DCAP quote layouts
# (header 48 bytes; v5 adds a 6-byte body descriptor) and AMD's SNP report (0x50).

_QUOTE_TEE_TYPE = {Tee.SGX: 0x00000000, Tee.TDX: 0x00000081}
_REPORT_DATA_IN_BODY = {Tee.SGX: 320, Tee.TDX: 520}


def _embedded_report_data(tee: Tee, blob: bytes) -> bytes:
    if tee is Tee.SNP:
        if len(blob) != SNP_REPORT_SIZE:
            raise AttestationError(
                f"SEV-SNP report must be {SNP_REPORT_SIZE} bytes, got {len(blob)}")
        return blob[0x50:0x90]
    if len(blob) < 48:
        raise AttestationError(f"{tee} quote too short ({len(blob)} bytes)")
    version, _key_type, tee_type = struct.unpack_from("<HHI", blob, 0)
    if tee_type != _QUOTE_TEE_TYPE[tee]:
        raise AttestationError(
            f"quote is not a {tee} quote (TEE type 0x{tee_type:08x})")
    if version in (3, 4):
        body = 48
    elif version == 5:
        body = 54
    else:
        raise AttestationError(f"{tee} quote has unsupported version {version}")
    start = body + _REPORT_DATA_IN_BODY[tee]
    if len(blob) < start + REPORT_DATA_SIZE:
        raise AttestationError(f"{tee} quote truncated ({len(blob)} bytes)")
    return blob[start:start + REPORT_DATA_SIZE]


def _require_bound(tee: Tee, blob: bytes, report_data: bytes) -> None:
    if _embedded_report_data(tee, blob) != report_data:
        raise AttestationError(
            f"{tee} evidence does not carry the report_data that was requested (another "
            f"request raced this one, or the TEE returned stale evidence)")


# --- file operations (one seam, so tests can imitate kernel side effects) ----------------

class _FileOps:
    """The few file-system calls the hardware attesters make."""

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as f:
            written = f.write(data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")

    def exists(self, path: Path) -> bool:
        return path.exists()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)


_fs = _FileOps()


# --- SGX (Gramine) -----------------------------------------------------------------------

# Gramine keeps one user_report_data per process: serialise write-then-read pairs.
_gramine_lock = threading.Lock()


class GramineSgxAttester:
    """SGX DCAP quotes through Gramine's ``/dev/attestation`` pseudo-files."""

    tee = Tee.SGX
    platform: SimPlatform | None = None

    def __init__(self, root: Path | str = DEFAULT_SGX_ROOT) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"GramineSgxAttester(root={str(self.root)!r})"

    def evidence(self, report_data: bytes) -> Evidence:
        data = _check_report_data(report_data)
        root = self.root
        type_file = root / "attestation_type"
        try:
            if _fs.exists(type_file):
                kind = _fs.read(type_file).decode("ascii", "replace").strip()
                if kind != "dcap":
                    raise AttestationError(
                        f"Gramine attestation type is {kind!r}, not 'dcap': set "
                        f"sgx.remote_attestation = \"dcap\" in the manifest")
            with _gramine_lock:
                _fs.write(root / "user_report_data", data)
                quote = _fs.read(root / "quote")
        except OSError as exc:
            raise AttestationError(
                f"SGX quote via Gramine ({root}) failed: {exc} (is this process running "
                f"inside Gramine-SGX with remote attestation enabled?)") from None
        _require_bound(Tee.SGX, quote, data)
        return Evidence(tee=Tee.SGX, data=quote)


# --- TDX and SEV-SNP (configfs-tsm) ------------------------------------------------------

class ConfigfsTsmAttester:
    """TDX / SEV-SNP evidence through Linux configfs-tsm (``Documentation/ABI/testing/
    configfs-tsm``): one fresh report entry per request, with the ``generation`` counter
    checked so that a concurrent writer to the same entry cannot go unnoticed."""

    platform: SimPlatform | None = None

    def __init__(self, tee: Tee | str, root: Path | str = DEFAULT_TSM_ROOT, *,
                 privlevel: int | None = None) -> None:
        tee = Tee(tee)
        if tee not in TSM_PROVIDERS:
            raise ConfigError(f"configfs-tsm serves tdx and snp, not {tee}")
        if privlevel is not None and tee is not Tee.SNP:
            raise ConfigError("privlevel applies to SEV-SNP only")
        if privlevel is not None and not 0 <= privlevel <= 3:
            raise ConfigError("SEV-SNP privlevel (VMPL) must be 0..3")
        self.tee = tee
        self.root = Path(root)
        self.privlevel = privlevel

    def __repr__(self) -> str:
        return f"ConfigfsTsmAttester(tee={self.tee.value!r}, root={str(self.root)!r})"

    def evidence(self, report_data: bytes) -> Evidence:
        data = _check_report_data(report_data)
        entry = self.root / f"sealedtorch-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            _fs.mkdir(entry)
        except OSError as exc:
            raise AttestationError(
                f"cannot create configfs-tsm report entry {entry}: {exc} (is configfs "
                f"mounted and is this a {self.tee} guest?)") from None
        try:
            return self._report(entry, data)
        except OSError as exc:
            raise AttestationError(
                f"{self.tee} report via configfs-tsm ({entry}) failed: {exc}") from None
        finally:
            try:
                _fs.rmdir(entry)
            except OSError as exc:
                log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)

    def _report(self, entry: Path, data: bytes) -> Evidence:
        provider = _read_text(entry / "provider")
        expected = TSM_PROVIDERS[self.tee]
        if provider != expected:
            raise AttestationError(
                f"configfs-tsm provider is {provider!r}, not {expected!r}: this guest "
                f"cannot produce {self.tee} evidence")
        before = _read_generation(entry)
        writes = 0
        if self.privlevel is not None:
            _fs.write(entry / "privlevel", f"{self.privlevel}\n".encode())
            writes += 1
        _fs.write(entry / "inblob", data)
        writes += 1
        outblob = _fs.read(entry / "outblob")
        certificates = None
        if self.tee is Tee.SNP:
            aux = entry / "auxblob"
            certificates = (_fs.read(aux) or None) if _fs.exists(aux) else None
        after = _read_generation(entry)
        if after != before + writes:
            raise AttestationError(
                f"configfs-tsm entry {entry} was written concurrently (generation went from "
                f"{before} to {after}, expected {before + writes}); the report may not be "
                f"ours, refusing it")
        if not outblob:
            raise AttestationError(f"configfs-tsm returned an empty {self.tee} report")
        _require_bound(self.tee, outblob, data)
        return Evidence(tee=self.tee, data=outblob, certificates=certificates)


def _read_text(path: Path) -> str:
    return _fs.read(path).decode("ascii", "replace").strip()


def _read_generation(entry: Path) -> int:
    text = _read_text(entry / "generation")
    try:
        return int(text)
    except ValueError:
        raise AttestationError(f"configfs-tsm generation is not a number: {text!r}") from None


def tsm_provider(root: Path | str = DEFAULT_TSM_ROOT) -> str | None:
    """The configfs-tsm provider name (``tdx_guest``, ``sev_guest``, ...), or ``None`` when
    configfs-tsm is absent or has no provider."""
    root = Path(root)
    if not root.is_dir():
        return None
    entry = root / f"sealedtorch-probe-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        _fs.mkdir(entry)
    except OSError:
        return None
    try:
        return _read_text(entry / "provider") or None
    except OSError:
        return None
    finally:
        try:
            _fs.rmdir(entry)
        except OSError as exc:
            log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)


# --- sim --------------------------------------------------------------------------------

class SimAttester:
    """The software TEE: evidence signed by a local sim platform key.  Insecure."""

    tee = Tee.SIM

    def __init__(self, platform: SimPlatform, measurement: bytes, debug: bool = False,
                 svn: int = 0) -> None:
        if len(measurement) != measure.MEASUREMENT_SIZE:
            raise ValueError(f"measurement must be {measure.MEASUREMENT_SIZE} bytes")
        self.platform = platform
        self.measurement = bytes(measurement)
        self.debug = debug
        self.svn = svn

    def __repr__(self) -> str:
        return (f"SimAttester(platform={str(self.platform.directory)!r}, "
                f"debug={self.debug}, svn={self.svn})")

    def evidence(self, report_data: bytes) -> Evidence:
        return self.platform.sign_evidence(
            _check_report_data(report_data), measurement=self.measurement, debug=self.debug,
            svn=self.svn)


def _sim_attester(sim_platform: Path | str | None, runtime_config: bytes, debug: bool,
                  svn: int) -> SimAttester:
    platform = SimPlatform.load(platform_dir(sim_platform))
    log.warning("using the INSECURE sim TEE (platform %s): its evidence proves nothing about "
                "hardware", platform.directory)
    return SimAttester(platform, measure.measurement(runtime_config), debug=debug, svn=svn)


# --- choosing ---------------------------------------------------------------------------

def detect(*, sim_platform: Path | str | None = None,
           sgx_root: Path | str = DEFAULT_SGX_ROOT, tsm_root: Path | str = DEFAULT_TSM_ROOT,
           runtime_config: bytes = b"", privlevel: int | None = None,
           sim_debug: bool = False, sim_svn: int = 0) -> Attester:
    """The attester for the TEE this process runs in.

    Order: Gramine-SGX if ``<sgx_root>/quote`` exists; else the configfs-tsm provider
    (``tdx_guest`` → TDX, ``sev_guest`` → SEV-SNP); else the sim TEE if a platform is given
    or ``$SEALEDTORCH_SIM_PLATFORM`` is set; else :class:`ConfigError`.
    """
    sgx_root = Path(sgx_root)
    if _fs.exists(sgx_root / "quote"):
        return GramineSgxAttester(sgx_root)
    provider = tsm_provider(tsm_root)
    for tee, name in TSM_PROVIDERS.items():
        if provider == name:
            return ConfigfsTsmAttester(tee, tsm_root,
                                       privlevel=privlevel if tee is Tee.SNP else None)
    try:
        sim_dir = platform_dir(sim_platform)
    except ConfigError:
        found = f"configfs-tsm provider {provider!r} is not supported" if provider else \
            f"no configfs-tsm provider at {tsm_root}"
        raise ConfigError(
            f"no TEE found: no Gramine SGX quote at {sgx_root / 'quote'}, {found}, and no "
            f"sim platform configured (pass --sim-platform DIR or set "
            f"$SEALEDTORCH_SIM_PLATFORM to use the insecure software TEE for "
            f"development)") from None
    return _sim_attester(sim_dir, runtime_config, sim_debug, sim_svn)


def get_attester(tee: str = "auto", *, sim_platform: Path | str | None = None,
                 sgx_root: Path | str = DEFAULT_SGX_ROOT,
                 tsm_root: Path | str = DEFAULT_TSM_ROOT, runtime_config: bytes = b"",
                 privlevel: int | None = None, sim_debug: bool = False,
                 sim_svn: int = 0) -> Attester:
    """The attester for ``tee``: ``auto`` (see :func:`detect`), ``sgx``, ``tdx``, ``snp`` or
    ``sim``.  Fails with :class:`ConfigError` if the requested TEE's interface is absent."""
    if tee == "auto":
        return detect(sim_platform=sim_platform, sgx_root=sgx_root, tsm_root=tsm_root,
                      runtime_config=runtime_config, privlevel=privlevel,
                      sim_debug=sim_debug, sim_svn=sim_svn)
    if tee == Tee.SGX:
        if not _fs.exists(Path(sgx_root) / "quote"):
            raise ConfigError(
                f"sgx requested but {Path(sgx_root) / 'quote'} does not exist: not running "
                f"inside Gramine-SGX with remote attestation enabled")
        return GramineSgxAttester(sgx_root)
    if tee in (Tee.TDX, Tee.SNP):
        if not Path(tsm_root).is_dir():
            raise ConfigError(
                f"{tee} requested but configfs-tsm ({tsm_root}) is not available: not a "
                f"{tee} guest, or configfs is not mounted (mount -t configfs none "
                f"/sys/kernel/config)")
        return ConfigfsTsmAttester(tee, tsm_root, privlevel=privlevel)
    if tee == Tee.SIM:
        return _sim_attester(sim_platform, runtime_config, sim_debug, sim_svn)
    raise ConfigError(f"unknown TEE {tee!r}: choose auto, sgx, tdx, snp or sim")
