"""Attesters against imitation trees of Gramine's /dev/attestation and Linux configfs-tsm.

No TEE hardware is available here.  The configfs imitation below is a temporary directory
plus the kernel's side effects (``drivers/virt/coco/tsm.c``): ``mkdir`` populates a report
entry, writing ``inblob``/``privlevel`` bumps ``generation`` and makes ``outblob`` a report
carrying that inblob, ``rmdir`` removes the entry.  The attester's own file operations still
run against the real temporary files.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from sealedtorch.attest import SimClaims, Tee, VerifierConfig, attesters, binding, measure, sim
from sealedtorch.attest import verify as front_door_verify
from sealedtorch.errors import AttestationError, ConfigError

EVIDENCE = Path("/work/shared/evidence")
NONCE = b"\x11" * 32
KEY = b"\x22" * 32


def _real(name: str) -> bytes:
    path = EVIDENCE / name
    if path.exists():
        return path.read_bytes()
    # Fallback (evidence tree not mounted): minimal blobs with the same header layout.
    if name.startswith("snp/"):
        return bytes(1184)
    if name.startswith("tdx/"):
        return struct.pack("<HHI", 4, 2, 0x81) + bytes(5000)
    return struct.pack("<HHI", 3, 2, 0) + bytes(4600)


TDX_QUOTE = _real("tdx/quote.bin")
SNP_REPORT = _real("snp/milan-report.bin")
SGX_QUOTE = _real("sgx/quote.bin")
RD_OFFSET = {Tee.TDX: 568, Tee.SNP: 0x50, Tee.SGX: 368}
TEMPLATE = {Tee.TDX: TDX_QUOTE, Tee.SNP: SNP_REPORT}


@pytest.fixture
def report_data():
    return binding.report_data(NONCE, KEY)


def _splice(tee: Tee, template: bytes, rd: bytes) -> bytes:
    off = RD_OFFSET[tee]
    return template[:off] + rd + template[off + 64:]


class FakeTsm(attesters._FileOps):
    """Kernel side effects of configfs-tsm over a temporary directory."""

    def __init__(self, provider: str = "tdx_guest", *, auxblob: bytes = b"",
                 outblob: bytes | None = None, race: int = 0) -> None:
        self.provider = provider
        self.auxblob = auxblob
        self.outblob = outblob  # fixed outblob instead of one carrying the inblob
        self.race = race  # extra generation bumps by "another writer" while we read outblob
        self.log: list[tuple[str, str]] = []
        self.inblobs: list[bytes] = []

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.log.append(("mkdir", path.name))
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "auxblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        (path / "privlevel_floor").write_text("0\n")

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        self.log.append(("write", path.name))
        entry = path.parent
        gen = int((entry / "generation").read_text()) + 1
        (entry / "generation").write_text(f"{gen}\n")
        if path.name == "inblob":
            self.inblobs.append(data)
            tee = Tee.SNP if self.provider == "sev_guest" else Tee.TDX
            template = TEMPLATE[tee]
            out = self.outblob if self.outblob is not None else _splice(tee, template, data)
            (entry / "outblob").write_bytes(out)
            (entry / "auxblob").write_bytes(self.auxblob)

    def read(self, path: Path) -> bytes:
        self.log.append(("read", path.name))
        if path.name == "outblob" and self.race:
            gen = int((path.parent / "generation").read_text()) + self.race
            (path.parent / "generation").write_text(f"{gen}\n")
        return super().read(path)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)
        self.log.append(("rmdir", path.name))


@pytest.fixture
def tsm(tmp_path, monkeypatch):
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)

    def install(**kwargs) -> FakeTsm:
        fake = FakeTsm(**kwargs)
        monkeypatch.setattr(attesters, "_fs", fake)
        return fake

    return root, install


@pytest.fixture
def gramine(tmp_path):
    root = tmp_path / "dev" / "attestation"
    root.mkdir(parents=True)
    (root / "quote").write_bytes(SGX_QUOTE)
    (root / "user_report_data").write_bytes(bytes(64))
    return root


# --- configfs-tsm: TDX -------------------------------------------------------------------

def test_tdx_report(tsm, report_data):
    root, install = tsm
    fake = install(provider="tdx_guest")
    att = attesters.ConfigfsTsmAttester(Tee.TDX, root)
    assert isinstance(att, attesters.Attester)
    ev = att.evidence(report_data)
    assert ev.tee is Tee.TDX
    assert ev.data == _splice(Tee.TDX, TDX_QUOTE, report_data)
    assert ev.certificates is None
    assert fake.inblobs == [report_data]
    assert list(root.iterdir()) == []  # entry removed
    ops = [op for op in fake.log if op[0] != "read" or op[1] != "provider"]
    assert ops[0][0] == "mkdir" and ops[-1][0] == "rmdir"
    reads_of_generation = [i for i, op in enumerate(fake.log) if op == ("read", "generation")]
    write_inblob = fake.log.index(("write", "inblob"))
    read_outblob = fake.log.index(("read", "outblob"))
    assert reads_of_generation[0] < write_inblob < read_outblob < reads_of_generation[-1]


def test_each_request_uses_a_fresh_entry(tsm, report_data):
    root, install = tsm
    fake = install()
    att = attesters.ConfigfsTsmAttester("tdx", root)
    att.evidence(report_data)
    att.evidence(report_data)
    names = [name for op, name in fake.log if op == "mkdir"]
    assert len(names) == 2 and names[0] != names[1]


def test_generation_jump_is_a_race(tsm, report_data):
    root, install = tsm
    install(race=1)
    with pytest.raises(AttestationError, match="written concurrently"):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(report_data)
    assert list(root.iterdir()) == []


def test_wrong_provider(tsm, report_data):
    root, install = tsm
    fake = install(provider="sev_guest")
    with pytest.raises(AttestationError, match="provider is 'sev_guest', not 'tdx_guest'"):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(report_data)
    assert fake.inblobs == []
    assert list(root.iterdir()) == []


def test_stale_report_not_carrying_our_report_data(tsm, report_data):
    root, install = tsm
    install(outblob=TDX_QUOTE)  # the real quote binds something else
    with pytest.raises(AttestationError, match="does not carry the report_data"):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(report_data)


@pytest.mark.parametrize("outblob, message", [
    (b"", "quote too short|empty"),
    (b"\x04\x00", "too short"),
    (SGX_QUOTE, "not a tdx quote"),
    (TDX_QUOTE[:600], "truncated"),
    (struct.pack("<HHI", 9, 2, 0x81) + bytes(1000), "unsupported version 9"),
])
def test_bad_tdx_outblob(tsm, report_data, outblob, message):
    root, install = tsm
    install(outblob=outblob)
    with pytest.raises(AttestationError, match=message):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(report_data)


def test_tdx_quote_v5_layout(report_data):
    body = bytearray(584)
    body[520:584] = report_data
    quote = struct.pack("<HHI", 5, 2, 0x81) + bytes(40) + struct.pack("<HI", 3, 648) \
        + bytes(body) + bytes(64)
    attesters._require_bound(Tee.TDX, quote, report_data)


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_report_data_must_be_64_bytes(tsm, size):
    root, install = tsm
    fake = install()
    with pytest.raises(ValueError, match="exactly 64 bytes"):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(bytes(size))
    assert fake.log == []  # nothing touched


def test_report_data_must_be_bytes(tsm):
    root, install = tsm
    install()
    with pytest.raises(TypeError):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence("x" * 64)  # type: ignore[arg-type]


def test_missing_configfs(tmp_path, report_data):
    with pytest.raises(AttestationError, match="cannot create configfs-tsm report entry"):
        attesters.ConfigfsTsmAttester(Tee.TDX, tmp_path / "absent").evidence(report_data)


def test_kernel_error_becomes_attestation_error(tsm, report_data, monkeypatch):
    root, install = tsm
    fake = install()

    def failing_read(path: Path) -> bytes:
        if path.name == "outblob":
            raise OSError(5, "Input/output error")
        return FakeTsm.read(fake, path)

    monkeypatch.setattr(fake, "read", failing_read)
    with pytest.raises(AttestationError, match="Input/output error"):
        attesters.ConfigfsTsmAttester(Tee.TDX, root).evidence(report_data)
    assert list(root.iterdir()) == []


def test_constructor_checks():
    with pytest.raises(ConfigError):
        attesters.ConfigfsTsmAttester(Tee.SGX)
    with pytest.raises(ConfigError):
        attesters.ConfigfsTsmAttester(Tee.TDX, privlevel=0)
    with pytest.raises(ConfigError):
        attesters.ConfigfsTsmAttester(Tee.SNP, privlevel=4)
    with pytest.raises(ValueError):
        attesters.ConfigfsTsmAttester("nope")


# --- configfs-tsm: SEV-SNP ---------------------------------------------------------------

def test_snp_report_with_certificate_table_and_privlevel(tsm, report_data):
    root, install = tsm
    fake = install(provider="sev_guest", auxblob=b"certificate-table")
    ev = attesters.ConfigfsTsmAttester(Tee.SNP, root, privlevel=2).evidence(report_data)
    assert ev.tee is Tee.SNP
    assert len(ev.data) == 1184
    assert ev.data[0x50:0x90] == report_data
    assert ev.certificates == b"certificate-table"
    writes = [name for op, name in fake.log if op == "write"]
    assert writes == ["privlevel", "inblob"]  # two writes, generation +2, no race reported
    assert list(root.iterdir()) == []


def test_snp_without_certificates(tsm, report_data):
    root, install = tsm
    install(provider="sev_guest")
    ev = attesters.ConfigfsTsmAttester(Tee.SNP, root).evidence(report_data)
    assert ev.certificates is None


def test_snp_race(tsm, report_data):
    root, install = tsm
    install(provider="sev_guest", race=2)
    with pytest.raises(AttestationError, match="generation went from 0 to 3, expected 1"):
        attesters.ConfigfsTsmAttester(Tee.SNP, root).evidence(report_data)


@pytest.mark.parametrize("size", [0, 1183, 1185, 4000])
def test_snp_wrong_size_report(tsm, report_data, size):
    root, install = tsm
    install(provider="sev_guest", outblob=bytes(size))
    with pytest.raises(AttestationError):
        attesters.ConfigfsTsmAttester(Tee.SNP, root).evidence(report_data)


def test_snp_on_tdx_guest(tsm, report_data):
    root, install = tsm
    install(provider="tdx_guest")
    with pytest.raises(AttestationError, match="cannot produce snp evidence"):
        attesters.ConfigfsTsmAttester(Tee.SNP, root).evidence(report_data)


# --- Gramine SGX -------------------------------------------------------------------------

def test_gramine_quote(gramine):
    rd = SGX_QUOTE[368:432]  # what the real sample quote binds
    (gramine / "attestation_type").write_text("dcap\n")
    att = attesters.GramineSgxAttester(gramine)
    assert isinstance(att, attesters.Attester) and att.tee is Tee.SGX
    ev = att.evidence(rd)
    assert ev.tee is Tee.SGX and ev.data == SGX_QUOTE
    assert (gramine / "user_report_data").read_bytes() == rd


def test_gramine_without_attestation_type_file(gramine):
    rd = SGX_QUOTE[368:432]
    assert attesters.GramineSgxAttester(gramine).evidence(rd).data == SGX_QUOTE


@pytest.mark.parametrize("kind", ["none", "epid", ""])
def test_gramine_non_dcap_refused(gramine, kind):
    (gramine / "attestation_type").write_text(kind)
    with pytest.raises(AttestationError, match="not 'dcap'"):
        attesters.GramineSgxAttester(gramine).evidence(SGX_QUOTE[368:432])


def test_gramine_quote_not_bound_to_our_report_data(gramine, report_data):
    with pytest.raises(AttestationError, match="does not carry the report_data"):
        attesters.GramineSgxAttester(gramine).evidence(report_data)


def test_gramine_wrong_quote(gramine):
    (gramine / "quote").write_bytes(TDX_QUOTE)
    with pytest.raises(AttestationError, match="not a sgx quote"):
        attesters.GramineSgxAttester(gramine).evidence(bytes(64))
    (gramine / "quote").write_bytes(b"")
    with pytest.raises(AttestationError, match="too short"):
        attesters.GramineSgxAttester(gramine).evidence(bytes(64))


def test_gramine_missing(tmp_path, report_data):
    with pytest.raises(AttestationError, match="inside Gramine-SGX"):
        attesters.GramineSgxAttester(tmp_path / "nothing").evidence(report_data)


@pytest.mark.parametrize("size", [0, 32, 65])
def test_gramine_report_data_size(gramine, size):
    with pytest.raises(ValueError):
        attesters.GramineSgxAttester(gramine).evidence(bytes(size))
    assert (gramine / "user_report_data").read_bytes() == bytes(64)  # untouched


# --- sim ---------------------------------------------------------------------------------

@pytest.fixture
def platform(tmp_path):
    return sim.init_platform(tmp_path / "sim")


def test_sim_attester_round_trip(platform, report_data, caplog):
    att = attesters.SimAttester(platform, measure.measurement(b"cfg"), debug=True, svn=5)
    assert isinstance(att, attesters.Attester) and att.tee is Tee.SIM
    ev = att.evidence(report_data)
    with caplog.at_level(logging.WARNING, logger="sealedtorch.attest.sim"):
        claims = front_door_verify(ev, config=VerifierConfig(
            sim_platform_keys=(platform.public_key,)))
    assert isinstance(claims, SimClaims)
    assert claims.insecure and claims.debug and claims.svn == 5
    assert claims.measurement == measure.measurement(b"cfg")
    binding.check(claims.report_data, NONCE, KEY)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)


def test_sim_attester_checks_sizes(platform):
    with pytest.raises(ValueError):
        attesters.SimAttester(platform, bytes(32))
    att = attesters.SimAttester(platform, bytes(48))
    with pytest.raises(ValueError, match="exactly 64 bytes"):
        att.evidence(bytes(63))


# --- detection and explicit choice -------------------------------------------------------

@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """Roots where no TEE interface exists, and no sim platform in the environment."""
    monkeypatch.delenv(sim.ENV_PLATFORM, raising=False)
    return {"sgx_root": tmp_path / "no-sgx", "tsm_root": tmp_path / "no-tsm"}


def test_detect_sgx(gramine, nowhere):
    att = attesters.detect(sgx_root=gramine, tsm_root=nowhere["tsm_root"])
    assert isinstance(att, attesters.GramineSgxAttester) and att.root == gramine


@pytest.mark.parametrize("provider, tee", [("tdx_guest", Tee.TDX), ("sev_guest", Tee.SNP)])
def test_detect_configfs_tsm(tsm, nowhere, provider, tee):
    root, install = tsm
    fake = install(provider=provider)
    att = attesters.detect(sgx_root=nowhere["sgx_root"], tsm_root=root)
    assert isinstance(att, attesters.ConfigfsTsmAttester) and att.tee is tee
    assert list(root.iterdir()) == []  # the probe entry was removed
    assert fake.inblobs == []


def test_detect_unknown_provider_without_sim(tsm, nowhere):
    root, install = tsm
    install(provider="arm_cca_guest")
    with pytest.raises(ConfigError, match="'arm_cca_guest' is not supported"):
        attesters.detect(sgx_root=nowhere["sgx_root"], tsm_root=root)


def test_detect_sim_explicit(platform, nowhere, caplog):
    with caplog.at_level(logging.WARNING):
        att = attesters.detect(sim_platform=platform.directory, runtime_config=b"c", **nowhere)
    assert isinstance(att, attesters.SimAttester)
    assert att.platform.public_key == platform.public_key
    assert att.measurement == measure.measurement(b"c")
    assert any("INSECURE sim TEE" in r.getMessage() for r in caplog.records)


def test_detect_sim_from_environment(platform, nowhere, monkeypatch):
    monkeypatch.setenv(sim.ENV_PLATFORM, str(platform.directory))
    att = attesters.detect(**nowhere)
    assert isinstance(att, attesters.SimAttester)


def test_detect_nothing(nowhere):
    with pytest.raises(ConfigError, match="no TEE found"):
        attesters.detect(**nowhere)


def test_detect_prefers_hardware_over_sim(gramine, platform, nowhere):
    att = attesters.detect(sim_platform=platform.directory, sgx_root=gramine,
                           tsm_root=nowhere["tsm_root"])
    assert isinstance(att, attesters.GramineSgxAttester)


def test_get_attester_by_name(gramine, tsm, platform, nowhere):
    root, install = tsm
    install(provider="sev_guest")
    assert isinstance(attesters.get_attester("sgx", sgx_root=gramine),
                      attesters.GramineSgxAttester)
    tdx = attesters.get_attester("tdx", tsm_root=root)
    assert isinstance(tdx, attesters.ConfigfsTsmAttester) and tdx.tee is Tee.TDX
    snp = attesters.get_attester("snp", tsm_root=root, privlevel=1)
    assert snp.tee is Tee.SNP and snp.privlevel == 1
    assert isinstance(attesters.get_attester("sim", sim_platform=platform.directory),
                      attesters.SimAttester)
    auto = attesters.get_attester("auto", tsm_root=root, sgx_root=nowhere["sgx_root"])
    assert auto.tee is Tee.SNP


def test_get_attester_errors(nowhere, tmp_path):
    with pytest.raises(ConfigError, match="unknown TEE 'tpm'"):
        attesters.get_attester("tpm")
    with pytest.raises(ConfigError, match="sgx requested"):
        attesters.get_attester("sgx", sgx_root=nowhere["sgx_root"])
    with pytest.raises(ConfigError, match="tdx requested"):
        attesters.get_attester("tdx", tsm_root=nowhere["tsm_root"])
    with pytest.raises(ConfigError, match=sim.ENV_PLATFORM):
        attesters.get_attester("sim")
    with pytest.raises(ConfigError, match="privlevel"):
        attesters.get_attester("tdx", tsm_root=tmp_path, privlevel=0)
