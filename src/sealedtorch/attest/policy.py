"""Per-model attestation policies (reference values) and the decision engine.

A *policy* is the relying party's reference values for one model: a list of rules, one
identity each, of the TEE runtimes that may **use** the model's key (``allow``) and,
optionally, of the key caches that may **hold** it on their behalf (``holders``, default:
the ``allow`` rules).  :func:`decide` appraises verified :class:`~.evidence.Claims`
against a list of rules and returns a :class:`Decision` that says which rule matched or,
when none did, every mismatch of every rule.

Policies are YAML (JSON is YAML) validated by pydantic with unknown fields forbidden, so a
typo is an error, never a silently ignored constraint.  See ``docs/policy.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from .. import uniquejson
from ..errors import PolicyDenied, PolicyError
from .evidence import Claims

__all__ = [
    "ADVISORY_STATUSES", "TCB_STATUSES", "CollateralPolicy", "Decision", "DeploymentPolicy",
    "Policy", "Rule", "SgxRule", "SimRule", "SnpRule", "SnpTcb", "TdxRule", "decide",
    "load_deployment_policy", "load_policy",
]

#: Every TCB status Intel's DCAP verification can report, best first.
TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
#: Statuses that come with Intel security advisories explaining why the TCB is not UpToDate.
ADVISORY_STATUSES: frozenset[str] = frozenset(TCB_STATUSES) - {"UpToDate"}

_HEX_RE = re.compile(r"[0-9a-f]*")

#: Bit numbers the strict checks read (TDX TDATTRIBUTES; SEV-SNP guest policy/PLATFORM_INFO).
TD_ATTR_SEPT_VE_DISABLE = 28
SNP_POLICY_SMT = 16
SNP_POLICY_MIGRATE_MA = 18
SNP_PLATFORM_SMT_EN = 0
_ADVISORY_RE = re.compile(r"INTEL-SA-\d{5}")


# --------------------------------------------------------------------------- field types

def _hex_of(nbytes: int) -> Callable[[Any], str]:
    digits = 2 * nbytes

    def check(value: Any) -> str:
        if isinstance(value, bytes | bytearray):
            value = bytes(value).hex()
        if not isinstance(value, str):
            hint = " (quote hex values in YAML)" if isinstance(value, int | float) else ""
            raise ValueError(
                f"expected a hex string of {nbytes} bytes, got {type(value).__name__}{hint}")
        text = value.strip().lower()
        if text.startswith("0x"):
            text = text[2:]
        if not _HEX_RE.fullmatch(text):
            raise ValueError(f"not a hex string: {value!r}")
        if len(text) != digits:
            raise ValueError(
                f"expected {digits} hex digits ({nbytes} bytes), got {len(text)}")
        return text

    return check


def _as_list(value: Any) -> Any:
    """``x`` and ``[x]`` mean the same thing: a list of allowed values."""
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _dedupe(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


_T = TypeVar("_T")

#: ``x`` or ``[x, ...]``: a non-empty list of allowed values, duplicates dropped.
AnyOf: TypeAlias = Annotated[list[_T], BeforeValidator(_as_list), Field(min_length=1),
                             AfterValidator(_dedupe)]

#: A list of named strict checks a rule gives up (``waive``), duplicates dropped.
Waivers: TypeAlias = Annotated[list[_T], AfterValidator(_dedupe)]

#: Lower-case hex of exactly N bytes (``0x`` prefix, upper case and raw bytes accepted).
Hex8: TypeAlias = Annotated[str, BeforeValidator(_hex_of(8))]
Hex16: TypeAlias = Annotated[str, BeforeValidator(_hex_of(16))]
Hex32: TypeAlias = Annotated[str, BeforeValidator(_hex_of(32))]
Hex48: TypeAlias = Annotated[str, BeforeValidator(_hex_of(48))]
Hex64: TypeAlias = Annotated[str, BeforeValidator(_hex_of(64))]
AnyOf8: TypeAlias = AnyOf[Hex8]
AnyOf16: TypeAlias = AnyOf[Hex16]
AnyOf32: TypeAlias = AnyOf[Hex32]
AnyOf48: TypeAlias = AnyOf[Hex48]
AnyOf64: TypeAlias = AnyOf[Hex64]

#: Unsigned integers of N bits (a JSON/YAML integer, never a bool, float or string).
U8: TypeAlias = Annotated[StrictInt, Field(ge=0, le=(1 << 8) - 1)]
U16: TypeAlias = Annotated[StrictInt, Field(ge=0, le=(1 << 16) - 1)]
U32: TypeAlias = Annotated[StrictInt, Field(ge=0, le=(1 << 32) - 1)]
AnyOfU16: TypeAlias = AnyOf[U16]


def _check_statuses(values: list[str]) -> list[str]:
    for status in values:
        if status not in TCB_STATUSES:
            raise ValueError(
                f"unknown TCB status {status!r} (known: {', '.join(TCB_STATUSES)})")
        if status == "Revoked":
            raise ValueError("a Revoked platform can never be allowed")
    return _dedupe(values)


def _check_advisories(values: list[str]) -> list[str]:
    out = []
    for advisory in values:
        normal = advisory.strip().upper()
        if not _ADVISORY_RE.fullmatch(normal):
            raise ValueError(f"not an Intel advisory id (INTEL-SA-NNNNN): {advisory!r}")
        out.append(normal)
    return _dedupe(out)


TcbStatusList: TypeAlias = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1),
                                     AfterValidator(_check_statuses)]
AdvisoryList: TypeAlias = Annotated[list[str], BeforeValidator(_as_list),
                                    AfterValidator(_check_advisories)]


def _rtmr_keys(value: Any) -> Any:
    """RTMR indexes are 0..3; JSON can only spell them as strings ("0")."""
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        index = key
        if isinstance(key, str) and key.strip().isdigit():
            index = int(key)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 3:
            raise ValueError(f"RTMR index must be 0, 1, 2 or 3, got {key!r}")
        if index in out:
            raise ValueError(f"RTMR {index} given twice")
        out[index] = item
    return dict(sorted(out.items()))


RtmrMap: TypeAlias = Annotated[dict[int, AnyOf48], BeforeValidator(_rtmr_keys)]


# --------------------------------------------------------------------------- rules

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RuleBase(_Strict):
    #: Accept TEEs running in debug mode (their memory is readable by the host).
    allow_debug: StrictBool = False


class _DcapRule(_RuleBase):
    tcb_status: TcbStatusList = Field(default_factory=lambda: ["UpToDate"])
    allowed_advisories: AdvisoryList = Field(default_factory=list)


class SgxRule(_DcapRule):
    """An SGX enclave, identified by MRENCLAVE and/or MRSIGNER (+ product id, min SVN)."""

    tee: Literal["sgx"]
    mr_enclave: AnyOf32 | None = None
    mr_signer: AnyOf32 | None = None
    isv_prod_id: AnyOfU16 | None = None
    min_isv_svn: U16 | None = None
    #: Key Separation and Sharing identity.  Unpinned fields must be all zero (no KSS
    #: identity is accepted silently) unless the rule waives ``kss``.
    isv_ext_prod_id: AnyOf16 | None = None
    isv_family_id: AnyOf16 | None = None
    config_id: AnyOf64 | None = None
    min_config_svn: U16 | None = None
    #: Strict checks this rule explicitly gives up (see docs/policy.md, "Waivers").
    waive: Waivers[Literal["kss"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _identity(self) -> SgxRule:
        if self.mr_enclave is None and self.mr_signer is None:
            raise ValueError("an sgx rule must pin mr_enclave or mr_signer "
                             "(otherwise any enclave would match)")
        return self


class TdxRule(_DcapRule):
    """A TDX trust domain, identified by MRTD (+ RTMRs, config/owner ids, TDX module)."""

    tee: Literal["tdx"]
    mr_td: AnyOf48 | None = None
    rtmr: RtmrMap | None = None
    mr_config_id: AnyOf48 | None = None
    mr_owner: AnyOf48 | None = None
    mr_owner_config: AnyOf48 | None = None
    mr_seam: AnyOf48 | None = None
    min_tee_tcb_svn: Hex16 | None = None
    #: Allowed XFAM values (8 bytes each); required unless the rule waives ``xfam``.
    xfam: AnyOf8 | None = None
    #: Strict checks this rule explicitly gives up: ``rtmr0``..``rtmr3`` (that RTMR is not
    #: pinned), ``xfam`` (any XFAM), ``sept_ve_disable`` (accept a TD that lets the host
    #: inject #VE on EPT violations).
    waive: Waivers[Literal["rtmr0", "rtmr1", "rtmr2", "rtmr3", "xfam", "sept_ve_disable"]] = \
        Field(default_factory=list)

    @model_validator(mode="after")
    def _identity(self) -> TdxRule:
        if self.mr_td is None:
            raise ValueError("a tdx rule must pin mr_td (otherwise any TD firmware would match)")
        for index in (self.rtmr or {}):
            if f"rtmr{index}" in self.waive:
                raise ValueError(f"rtmr {index} is both pinned and waived")
        if self.xfam is not None and "xfam" in self.waive:
            raise ValueError("xfam is both pinned and waived")
        return self


class SnpTcb(_Strict):
    """Minimum SEV-SNP TCB component versions (each 0..255); unset components are free."""

    bootloader: U8 | None = None
    tee: U8 | None = None
    snp: U8 | None = None
    microcode: U8 | None = None
    fmc: U8 | None = None


class SnpRule(_RuleBase):
    """An SEV-SNP guest, identified by its launch measurement and/or ID-block keys."""

    tee: Literal["snp"]
    measurement: AnyOf48 | None = None
    host_data: AnyOf32 | None = None
    id_key_digest: AnyOf48 | None = None
    author_key_digest: AnyOf48 | None = None
    min_guest_svn: U32 | None = None
    #: The highest (least privileged) VMPL accepted; 0 by default: only the guest's own
    #: most privileged level, never an SVSM-less lower level that a paravisor controls.
    vmpl: Annotated[StrictInt, Field(ge=0, le=3)] = 0
    #: TCB floor; required unless the rule waives ``min_tcb``.
    min_tcb: SnpTcb | None = None
    #: Strict checks this rule explicitly gives up: ``smt`` (guest policy allows SMT or the
    #: platform runs with SMT on), ``migrate_ma`` (a migration agent may be associated),
    #: ``min_tcb`` (no TCB floor in this rule).
    waive: Waivers[Literal["smt", "migrate_ma", "min_tcb"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _identity(self) -> SnpRule:
        if self.measurement is None and self.id_key_digest is None \
                and self.author_key_digest is None:
            raise ValueError("an snp rule must pin measurement, id_key_digest or "
                             "author_key_digest (otherwise any guest would match)")
        if self.min_tcb is not None and "min_tcb" in self.waive:
            raise ValueError("min_tcb is both set and waived")
        return self


class SimRule(_RuleBase):
    """The software TEE (development and tests only; proves nothing about hardware)."""

    tee: Literal["sim"]
    measurement: AnyOf48
    min_svn: U32 | None = None
    platform_key: AnyOf32 | None = None


Rule = Annotated[SgxRule | TdxRule | SnpRule | SimRule, Field(discriminator="tee")]
RuleList = Annotated[list[Rule], Field(min_length=1)]


#: Lease length (seconds) of a released key when the policy sets no ``lease_seconds``: a
#: keycache that cannot renew stops serving the key this long after its last release.
DEFAULT_LEASE_SECONDS = 300
#: Bounds of ``lease_seconds``: at least 1 s, at most one day (a longer lease would make
#: revocation meaningless against a host that cuts the keycache's network).
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 1, 86_400
LeaseSeconds = Annotated[StrictInt, Field(ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS)]


class Policy(_Strict):
    """Reference values for one model: who may use its key, who may hold it."""

    allow: RuleList
    holders: RuleList | None = None
    #: How long each release of this model's key is leased to a keycache (seconds); unset
    #: means :data:`DEFAULT_LEASE_SECONDS`.  Unset is left out of the canonical form, so
    #: policies written before leases existed keep their digest.
    lease_seconds: LeaseSeconds | None = None

    @property
    def lease_duration(self) -> int:
        """The lease length the keyserver signs into every release of this model's key."""
        return self.lease_seconds if self.lease_seconds is not None else DEFAULT_LEASE_SECONDS

    @property
    def holder_rules(self) -> list[Rule]:
        """Rules for key caches that hold the key for runtimes (default: ``allow``)."""
        return self.holders if self.holders is not None else self.allow

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form; :func:`load_policy` reads it back to an equal policy."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("allow", "holders"):  # put each rule's tee first, for readers
            if key in data:
                data[key] = [{"tee": rule["tee"], **rule} for rule in data[key]]
        return data

    def canonical_bytes(self) -> bytes:
        """Canonical JSON: normalised values, defaults spelled out, keys sorted, no spaces."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`: names this policy version in audit logs."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def decide_use(self, claims: Claims) -> Decision:
        """May the attested runtime *use* (receive to decrypt with) the key?"""
        return decide(claims, self.allow, role="allow")

    def decide_hold(self, claims: Claims) -> Decision:
        """May the attested key cache *hold* the key for runtimes?"""
        role = "holders" if self.holders is not None else "allow"
        return decide(claims, self.holder_rules, role=role)


_POLICY_ADAPTER = TypeAdapter(Policy)


# --------------------------------------------------------------------------- deployment

class SgxFloor(_Strict):
    """What every SGX enclave must show before it gets an attestation token."""

    tcb_status: TcbStatusList = Field(default_factory=lambda: ["UpToDate"])


class TdxFloor(_Strict):
    """What every TDX trust domain must show before it gets an attestation token."""

    tcb_status: TcbStatusList = Field(default_factory=lambda: ["UpToDate"])
    min_tee_tcb_svn: Hex16 | None = None


class SnpFloor(_Strict):
    """What every SEV-SNP guest must show before it gets an attestation token."""

    min_tcb: SnpTcb | None = None
    vmpl: Annotated[StrictInt, Field(ge=0, le=3)] = 0
    #: Refuse a report whose certificate chain could not be checked against AMD's CRL.
    require_crl: StrictBool = False


class CollateralPolicy(_Strict):
    """Which collateral the verifier trusts (see docs/attestation.md, "Collateral")."""

    #: ``verifier``: the keyserver's own cached or PCCS-fetched DCAP collateral wins over the
    #: collateral the attester sent (used only when the verifier has none); ``evidence``: the
    #: attester's collateral is used when it sends one.
    prefer: Literal["verifier", "evidence"] = "verifier"
    #: Refuse DCAP collateral (TCB info and QE identity) older than this TCB recovery.
    min_tcb_evaluation_data_number: U32 | None = None


_TEE_NAMES = Literal["sgx", "tdx", "snp", "sim"]


def _every_tee() -> list[_TEE_NAMES]:
    return ["sgx", "tdx", "snp", "sim"]


class DeploymentPolicy(_Strict):
    """The keyserver's own attestation policy, applied to every evidence *before* a token is
    issued, whatever model the token is later used for.  Per-model policies can only narrow
    it.  Defaults are strict: hardware TEEs (and ``sim`` only where a sim platform key is
    explicitly trusted), no debug TEEs, ``UpToDate`` DCAP platforms, SNP VMPL 0."""

    tees: Annotated[list[_TEE_NAMES], Field(min_length=1), AfterValidator(_dedupe)] = \
        Field(default_factory=_every_tee)
    allow_debug: StrictBool = False
    sgx: SgxFloor = Field(default_factory=SgxFloor)
    tdx: TdxFloor = Field(default_factory=TdxFloor)
    snp: SnpFloor = Field(default_factory=SnpFloor)
    collateral: CollateralPolicy = Field(default_factory=CollateralPolicy)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def decide(self, claims: Claims, *, sim_trusted: bool) -> Decision:
        """May this verified evidence get an attestation token at all?  Never raises."""
        out: list[str] = []
        try:
            self._check(claims, sim_trusted, out)
        except Exception as exc:  # malformed claims deny, never crash the relying party
            out.append(f"could not evaluate: {type(exc).__name__}: {exc}")
        if out:
            return Decision(False, tuple(f"deployment: {m}" for m in out), None, "deployment")
        return Decision(True, ("deployment: matched",), 0, "deployment")

    def _check(self, claims: Claims, sim_trusted: bool, out: list[str]) -> None:
        tee = _claim(claims, "tee")
        if tee not in self.tees:
            out.append(f"tee: expected one of [{', '.join(self.tees)}], got {_show(tee)}")
            return
        if tee == "sim" and not sim_trusted:
            out.append("tee: sim evidence is accepted only by a keyserver that explicitly "
                       "trusts a sim platform key (--trust-sim-root)")
        debug = _claim(claims, "debug")
        if debug is not False and not self.allow_debug:
            out.append(f"debug: expected false, got {_show(debug)}")
        if tee in ("sgx", "tdx"):
            floor = self.sgx if tee == "sgx" else self.tdx
            status = _claim(claims, "tcb_status")
            if status not in floor.tcb_status:
                out.append(f"tcb_status: expected {_expected(floor.tcb_status)}, got "
                           f"{_show(status)}")
            if isinstance(floor, TdxFloor) and floor.min_tee_tcb_svn is not None:
                _match_tee_tcb_svn(out, claims, floor.min_tee_tcb_svn)
        elif tee == "snp":
            got = _claim(claims, "vmpl")
            if not (_is_int(got) and 0 <= got <= self.snp.vmpl):
                out.append(f"vmpl: expected <= {self.snp.vmpl}, got {_show(got)}")
            if self.snp.min_tcb is not None:
                _match_snp_tcb(out, claims, self.snp.min_tcb)
            crl = _claim(claims, "crl_status")
            if self.snp.require_crl and crl != "good":
                out.append(f"crl_status: expected good (require_crl), got {_show(crl)}")


def load_deployment_policy(source: dict[str, Any] | None) -> DeploymentPolicy:
    """The ``attestation_policy`` section of keyserver.json (None: the strict defaults).

    Raises :class:`~sealedtorch.errors.PolicyError` naming each bad field."""
    if source is None:
        return DeploymentPolicy()
    if not isinstance(source, dict):
        raise PolicyError(f"invalid attestation_policy: expected a mapping, got "
                          f"{type(source).__name__}")
    try:
        return DeploymentPolicy.model_validate(source)
    except ValidationError as exc:
        problems = "; ".join(_format_error(err) for err in exc.errors())
        raise PolicyError(f"invalid attestation_policy: {problems}") from None


# --------------------------------------------------------------------------- loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (the last one would silently win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: let the base constructor report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)



def _parse_text(text: str, label: str) -> Any:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:  # JSON is YAML, but PyYAML stumbles on tab indentation: try JSON first
            return uniquejson.loads(
                text, error=lambda problem: PolicyError(f"invalid policy {label}: {problem}"))
        except ValueError:
            pass  # not JSON after all: YAML says what is wrong with it
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
            mark = exc.problem_mark
            detail = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        raise PolicyError(f"invalid policy {label}: not valid YAML/JSON: {detail}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"invalid policy {path}: not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None


def _source_data(source: str | bytes | Path | dict[str, Any]) -> tuple[Any, str]:
    if isinstance(source, dict):
        return source, "<dict>"
    if isinstance(source, Path):
        return _parse_text(_read(source), str(source)), str(source)
    if isinstance(source, bytes | bytearray):
        try:
            text = bytes(source).decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("invalid policy <bytes>: not UTF-8 text") from None
        return _parse_text(text, "<bytes>"), "<bytes>"
    if isinstance(source, str):
        # A one-line string naming an existing file is a path; otherwise it is the document,
        # unless it parses to a bare scalar, which can only be a path that does not exist.
        if "\n" not in source and source.strip():
            candidate = Path(source)
            try:
                is_file = candidate.is_file()
            except OSError:  # e.g. a name too long to be a path
                is_file = False
            if is_file:
                return _parse_text(_read(candidate), source), source
            data = _parse_text(source, "<text>")
            if not isinstance(data, dict | list):
                raise PolicyError(f"policy file not found: {source}")
            return data, "<text>"
        return _parse_text(source, "<text>"), "<text>"
    raise PolicyError(f"cannot load a policy from {type(source).__name__}")


_TEE_TAGS = {"sgx", "tdx", "snp", "sim"}


def _format_loc(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    # pydantic names the union member after a rule's index (allow, 0, "sgx", field): drop it.
    if len(parts) >= 3 and parts[0] in ("allow", "holders") and parts[2] in _TEE_TAGS:
        del parts[2]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _format_error(err: Any) -> str:
    kind = err["type"]
    msg: str = err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "missing":
        msg = "required field missing"
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = f"unknown tee {ctx.get('tag')!r} (expected one of sgx, tdx, snp, sim)"
    elif kind == "union_tag_not_found":
        msg = "missing 'tee' (one of sgx, tdx, snp, sim)"
    elif kind == "too_short":
        top = len(err["loc"]) == 1 and err["loc"][0] in ("allow", "holders")
        msg = "must list at least one rule" if top else "must list at least one value"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{_format_loc(err['loc'])}: {msg}"


def load_policy(source: str | bytes | Path | dict[str, Any] | Policy) -> Policy:
    """Load and validate a policy from a file path, YAML/JSON text or bytes, or a dict.

    Raises :class:`~sealedtorch.errors.PolicyError` naming the source, the field path and
    the problem, for every problem found.
    """
    if isinstance(source, Policy):
        return source
    data, label = _source_data(source)
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise PolicyError(
            f"invalid policy {label}: expected a mapping with an 'allow' list, got {got}")
    try:
        return _POLICY_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_format_error(err) for err in exc.errors())
        raise PolicyError(f"invalid policy {label}: {problems}") from None


# --------------------------------------------------------------------------- decisions

@dataclass(frozen=True)
class Decision:
    """The attestation result of one appraisal against one list of rules.

    ``reasons``: on allow, the rule that matched (and anything notable it accepted); on
    deny, every mismatch of every rule, each prefixed by the rule's list, index and TEE.
    """

    allowed: bool
    reasons: tuple[str, ...]
    matched_rule: int | None
    role: str = "allow"

    def raise_if_denied(self) -> None:
        if not self.allowed:
            raise PolicyDenied(f"no {self.role} rule of the policy matches", self.reasons)


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing (field absent from claims)"
    if value is None:
        return "none"
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex() if value else "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _expected(values: Sequence[Any]) -> str:
    if len(values) == 1:
        return _show(values[0])
    return "one of [" + ", ".join(_show(v) for v in values) + "]"


def _claim(claims: Claims, name: str) -> Any:
    return getattr(claims, name, _MISSING)


def _match_hex(out: list[str], name: str, got: Any, allowed: Sequence[str] | None) -> None:
    if allowed is None:
        return
    if not (isinstance(got, bytes | bytearray) and bytes(got).hex() in allowed):
        out.append(f"{name}: expected {_expected(allowed)}, got {_show(got)}")


def _match_zero(out: list[str], name: str, got: Any, size: int, waiver: str) -> None:
    if not (isinstance(got, bytes | bytearray) and len(got) == size and not any(got)):
        out.append(f"{name}: expected all zero (not pinned by the rule), got {_show(got)} "
                   f"(pin {name} or waive: [{waiver}])")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _match_min(out: list[str], name: str, got: Any, minimum: int | None) -> None:
    if minimum is None:
        return
    if not (_is_int(got) and got >= minimum):
        out.append(f"{name}: expected >= {minimum}, got {_show(got)}")


def _check_common(rule: Any, claims: Claims, out: list[str]) -> None:
    debug = _claim(claims, "debug")
    if debug is not False and not rule.allow_debug:
        out.append(f"debug: expected false, got {_show(debug)} "
                   "(set allow_debug: true to accept debug TEEs)")
    insecure = _claim(claims, "insecure")
    if rule.tee != "sim" and insecure is not False:
        out.append(f"insecure: expected false (only a sim rule accepts insecure evidence), "
                   f"got {_show(insecure)}")


def _check_tcb(rule: SgxRule | TdxRule, claims: Claims, out: list[str]) -> None:
    status = _claim(claims, "tcb_status")
    if status not in rule.tcb_status:
        out.append(f"tcb_status: expected {_expected(rule.tcb_status)}, got {_show(status)}")
    advisories = _claim(claims, "advisory_ids")
    if not isinstance(advisories, tuple | list) \
            or not all(isinstance(a, str) for a in advisories):
        out.append(f"advisory_ids: expected a list of advisory ids, got {_show(advisories)}")
        return
    # Every advisory the verifier reports is checked, whatever the status: fail closed.
    refused = [a for a in advisories if a.strip().upper() not in rule.allowed_advisories]
    if refused:
        allowed = ", ".join(rule.allowed_advisories)
        out.append(f"advisory_ids: expected only allowed_advisories [{allowed}], "
                   f"got [{', '.join(advisories)}] (not allowed: {', '.join(refused)})")


def _check_sgx(rule: SgxRule, claims: Claims, out: list[str]) -> None:
    _check_tcb(rule, claims, out)
    _match_hex(out, "mr_enclave", _claim(claims, "mr_enclave"), rule.mr_enclave)
    _match_hex(out, "mr_signer", _claim(claims, "mr_signer"), rule.mr_signer)
    if rule.isv_prod_id is not None:
        got = _claim(claims, "isv_prod_id")
        if not (_is_int(got) and got in rule.isv_prod_id):
            out.append(f"isv_prod_id: expected {_expected(rule.isv_prod_id)}, got {_show(got)}")
    _match_min(out, "isv_svn", _claim(claims, "isv_svn"), rule.min_isv_svn)
    if "kss" in rule.waive:
        return
    for name, size in (("isv_ext_prod_id", 16), ("isv_family_id", 16), ("config_id", 64)):
        allowed = getattr(rule, name)
        if allowed is not None:
            _match_hex(out, name, _claim(claims, name), allowed)
        else:
            _match_zero(out, name, _claim(claims, name), size, "kss")
    got = _claim(claims, "config_svn")
    if rule.min_config_svn is not None:
        _match_min(out, "config_svn", got, rule.min_config_svn)
    elif got != 0:
        out.append(f"config_svn: expected 0 (no KSS config pinned), got {_show(got)} "
                   "(pin min_config_svn or waive: [kss])")


def _check_tdx(rule: TdxRule, claims: Claims, out: list[str]) -> None:
    _check_tcb(rule, claims, out)
    _match_hex(out, "mr_td", _claim(claims, "mr_td"), rule.mr_td)
    pinned = rule.rtmr or {}
    for index in range(4):
        if index in pinned:
            _match_hex(out, f"rtmr[{index}]", _claim(claims, f"rtmr{index}"), pinned[index])
        elif f"rtmr{index}" not in rule.waive:
            out.append(f"rtmr[{index}]: not pinned by the rule (pin rtmr.{index} or waive: "
                       f"[rtmr{index}])")
    attributes = _claim(claims, "td_attributes")
    if not (isinstance(attributes, bytes | bytearray) and len(attributes) == 8):
        out.append(f"td_attributes: expected 8 bytes, got {_show(attributes)}")
    elif "sept_ve_disable" not in rule.waive \
            and not int.from_bytes(attributes, "little") >> TD_ATTR_SEPT_VE_DISABLE & 1:
        out.append(f"td_attributes: SEPT_VE_DISABLE (bit 28) is not set in "
                   f"{bytes(attributes).hex()}: the host can inject #VE on EPT violations "
                   "(waive: [sept_ve_disable] to accept)")
    if rule.xfam is not None:
        _match_hex(out, "xfam", _claim(claims, "xfam"), rule.xfam)
    elif "xfam" not in rule.waive:
        out.append(f"xfam: not pinned by the rule, got {_show(_claim(claims, 'xfam'))} "
                   "(pin xfam or waive: [xfam])")
    for name in ("mr_config_id", "mr_owner", "mr_owner_config", "mr_seam"):
        _match_hex(out, name, _claim(claims, name), getattr(rule, name))
    if rule.min_tee_tcb_svn is not None:
        _match_tee_tcb_svn(out, claims, rule.min_tee_tcb_svn)


def _match_tee_tcb_svn(out: list[str], claims: Claims, floor: str) -> None:
    minimum = bytes.fromhex(floor)
    got = _claim(claims, "tee_tcb_svn")
    expected = f"every byte >= {floor}"
    if not (isinstance(got, bytes | bytearray) and len(got) == len(minimum)):
        out.append(f"tee_tcb_svn: expected {expected}, got {_show(got)}")
    else:
        low = [f"byte {i}: {g} < {m}" for i, (g, m) in enumerate(zip(got, minimum, strict=True))
               if g < m]
        if low:
            out.append(f"tee_tcb_svn: expected {expected}, got {_show(got)} "
                       f"({', '.join(low)})")


def _check_snp(rule: SnpRule, claims: Claims, out: list[str]) -> None:
    for name in ("measurement", "host_data", "id_key_digest", "author_key_digest"):
        _match_hex(out, name, _claim(claims, name), getattr(rule, name))
    _match_min(out, "guest_svn", _claim(claims, "guest_svn"), rule.min_guest_svn)
    got = _claim(claims, "vmpl")
    if not (_is_int(got) and 0 <= got <= rule.vmpl):
        out.append(f"vmpl: expected <= {rule.vmpl}, got {_show(got)}")
    if rule.min_tcb is not None:
        _match_snp_tcb(out, claims, rule.min_tcb)
    elif "min_tcb" not in rule.waive:
        out.append("reported_tcb: the rule sets no TCB floor (set min_tcb or waive: [min_tcb])")
    guest_policy = _claim(claims, "policy")
    if not _is_int(guest_policy):
        out.append(f"policy: expected the guest policy, got {_show(guest_policy)}")
        return
    if guest_policy >> SNP_POLICY_MIGRATE_MA & 1 and "migrate_ma" not in rule.waive:
        out.append(f"policy: MIGRATE_MA (bit 18) is set in 0x{guest_policy:x}: a migration "
                   "agent may be associated (waive: [migrate_ma] to accept)")
    platform_info = _claim(claims, "platform_info")
    if not _is_int(platform_info):
        out.append(f"platform_info: expected a value, got {_show(platform_info)}")
    elif "smt" not in rule.waive:
        if guest_policy >> SNP_POLICY_SMT & 1:
            out.append(f"policy: SMT (bit 16) is set in 0x{guest_policy:x}: the guest may run "
                       "with simultaneous multithreading (waive: [smt] to accept)")
        if platform_info >> SNP_PLATFORM_SMT_EN & 1:
            out.append(f"platform_info: SMT_EN (bit 0) is set in 0x{platform_info:x}: the "
                       "platform runs with SMT enabled (waive: [smt] to accept)")


def _match_snp_tcb(out: list[str], claims: Claims, floor: SnpTcb, prefix: str = "") -> None:
    tcb = _claim(claims, "reported_tcb")
    for component, minimum in floor.model_dump(exclude_none=True).items():
        got = tcb.get(component, _MISSING) if isinstance(tcb, dict) else _MISSING
        _match_min(out, f"{prefix}reported_tcb.{component}", got, minimum)


def _check_sim(rule: SimRule, claims: Claims, out: list[str]) -> None:
    _match_hex(out, "measurement", _claim(claims, "measurement"), rule.measurement)
    _match_min(out, "svn", _claim(claims, "svn"), rule.min_svn)
    _match_hex(out, "platform_key", _claim(claims, "platform_key"), rule.platform_key)


_CHECKS: dict[str, Callable[[Any, Claims, list[str]], None]] = {
    "sgx": _check_sgx, "tdx": _check_tdx, "snp": _check_snp, "sim": _check_sim,
}


def _mismatches(rule: Rule, claims: Claims) -> list[str]:
    out: list[str] = []
    try:
        tee = _claim(claims, "tee")
        if tee != rule.tee:
            return [f"tee: expected {rule.tee}, got {_show(tee)}"]
        _check_common(rule, claims, out)
        _CHECKS[rule.tee](rule, claims, out)
    except Exception as exc:  # malformed claims must deny, never crash the relying party
        out.append(f"could not evaluate rule: {type(exc).__name__}: {exc}")
    return out


def _notes(rule: Rule, claims: Claims) -> list[str]:
    notes = []
    if _claim(claims, "debug") is True:
        notes.append("accepted a debug TEE (allow_debug)")
    if _claim(claims, "insecure") is True:
        notes.append("accepted insecure sim evidence (development only)")
    status = _claim(claims, "tcb_status")
    if isinstance(rule, SgxRule | TdxRule) and status != "UpToDate":
        advisories = _claim(claims, "advisory_ids")
        listed = ", ".join(advisories) if isinstance(advisories, tuple | list) else ""
        notes.append(f"accepted tcb_status {_show(status)} with advisories [{listed}]")
    return notes


def decide(claims: Claims, rules: Sequence[Rule], *, role: str = "allow") -> Decision:
    """Appraise verified ``claims`` against ``rules``: allowed if ANY rule matches.

    A rule matches only if ALL its constraints hold.  The first matching rule wins.  Never
    raises on odd claims: anything that cannot be checked is a mismatch.
    """
    if not rules:
        return Decision(False, (f"{role}: no rules",), None, role)
    reasons: list[str] = []
    for index, rule in enumerate(rules):
        label = f"{role}[{index}] ({rule.tee})"
        mismatches = _mismatches(rule, claims)
        if not mismatches:
            notes = [f"{label}: {note}" for note in _notes(rule, claims)]
            return Decision(True, (f"{label}: matched", *notes), index, role)
        reasons.extend(f"{label}: {m}" for m in mismatches)
    return Decision(False, tuple(reasons), None, role)
