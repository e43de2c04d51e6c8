"""A KEK inside a PKCS#11 token (an HSM; SoftHSM2 in the tests), via ``python-pkcs11``.

The KEK is an AES-256 secret-key object that is ``CKA_SENSITIVE`` and not
``CKA_EXTRACTABLE``: its value never leaves the token.  Wrapping is ``CKM_AES_GCM`` done by
the token, with a fresh random 96-bit IV and the model id + version
(:func:`~.kek_base.key_aad`) as associated data; a wrapped key is IV ‖ ciphertext ‖ 128-bit tag,
the same layout and size as :class:`~.kek.FileKek`'s.  (SoftHSM2 2.6 offers
``CKM_AES_GCM`` with associated data, so ``CKM_AES_KEY_WRAP_PAD``, which cannot bind the
model id, is not used; a token without GCM is refused with a clear error.)

The token is named by an RFC 7512 URI::

    pkcs11:token=LABEL;object=KEYLABEL?module-path=/usr/lib/softhsm/libsofthsm2.so
          &pin-source=file:/etc/sealedtorch/hsm.pin

Path attributes: ``token``, ``serial``, ``manufacturer``, ``model``, ``slot-id`` (which
token), ``object``, ``id``, ``type=secret-key`` (which key).  Query attributes:
``module-path`` (absolute; required) and ``pin-source`` — ``file:/absolute/path`` (a file
only its owner may read) or ``env:NAME`` (an environment variable; a sealedtorch
extension).  ``pin-value`` is refused: a PIN never appears in a URI, a command line, a
configuration file or a log.

Threads: ``python-pkcs11`` initialises a module without ``CKF_OS_LOCKING_OK``, which lets
the module assume it is never called from two threads at once (SoftHSM2 then switches its
own locking off).  Every call into one module is therefore serialised by one lock, and a
token is used through one logged-in session per process (PKCS#11 logins belong to the
application, not to a session: a second ``C_Login`` fails and any ``C_Logout`` ends them
all).  A lost session (token removed, HSM restarted) is reopened once, re-reading the PIN.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .. import crypto, secretfile
from ..errors import (
    ConfigError,
    IntegrityError,
    KekLoginError,
    KekObjectNotFound,
    KekTokenNotFound,
    KekUnavailable,
)
from .kek_base import check_kek_id, key_aad

T = TypeVar("T")

_PATH_ATTRS = ("token", "serial", "manufacturer", "model", "slot-id", "object", "id", "type")
_QUERY_ATTRS = ("module-path", "pin-source")
_PATH_SAFE = "-._~&:[]@!$'()*+,="
_QUERY_SAFE = "-._~:[]@!$'()*+,=/?|"
_TAG_BITS = 128


def _import() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise ConfigError("a pkcs11: KEK needs python-pkcs11: pip install "
                          "'sealedtorch[hsm]'") from None
    return pkcs11


# --------------------------------------------------------------------------- URI

@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 URI naming a token and a secret-key object in it."""

    module_path: str
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise ConfigError("a PKCS#11 URI starts with 'pkcs11:'")
        rest = text[len("pkcs11:"):]
        path, _, query = rest.partition("?")
        attrs: dict[str, str | bytes] = {}
        _read_attrs(attrs, path, _PATH_ATTRS, ";")
        _read_attrs(attrs, query, _QUERY_ATTRS, "&")
        module = _check_key_attrs(attrs)
        slot = _slot_id(attrs)
        pin_source = attrs.get("pin-source")
        if pin_source is not None:
            _check_pin_source(str(pin_source))
        ident = attrs.get("id")
        return cls(module_path=module, token=_str(attrs.get("token")),
                   serial=_str(attrs.get("serial")),
                   manufacturer=_str(attrs.get("manufacturer")),
                   model=_str(attrs.get("model")), slot_id=slot,
                   object=_str(attrs.get("object")),
                   id=ident if isinstance(ident, bytes) else None,
                   pin_source=_str(pin_source))

    def text(self) -> str:
        """The canonical form (fixed attribute order, percent-encoded; holds no secret)."""
        path = []
        for name, value in (("token", self.token), ("serial", self.serial),
                            ("manufacturer", self.manufacturer), ("model", self.model),
                            ("slot-id", None if self.slot_id is None else str(self.slot_id)),
                            ("object", self.object)):
            if value is not None:
                path.append(f"{name}={urllib.parse.quote(value, safe=_PATH_SAFE)}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        query = [f"module-path={urllib.parse.quote(self.module_path, safe=_QUERY_SAFE)}"]
        if self.pin_source is not None:
            query.append(f"pin-source={urllib.parse.quote(self.pin_source, safe=_QUERY_SAFE)}")
        return "pkcs11:" + ";".join(path) + "?" + "&".join(query)

    def __str__(self) -> str:
        return self.text()

    def describe_key(self) -> str:
        what = f"object={self.object!r}" if self.object is not None else ""
        if self.id is not None:
            what += (" " if what else "") + f"id={self.id.hex()}"
        return what


def _read_attrs(attrs: dict[str, str | bytes], part: str, allowed: tuple[str, ...],
                sep: str) -> None:
    """Add the ``name=value`` items of one URI part to ``attrs``: percent-decoded, ``id``
    as bytes, the rest UTF-8; an unknown, repeated or value-less attribute is refused, and
    so is ``pin-value`` (a PIN must never be in a URI)."""
    for item in filter(None, part.split(sep)):
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"PKCS#11 URI: attribute {name!r} has no value")
        if name == "pin-value":
            raise ConfigError("PKCS#11 URI: pin-value is refused (a PIN must never "
                              "be in a URI); use pin-source=file:/path or env:NAME")
        if name not in allowed:
            raise ConfigError(f"PKCS#11 URI: unsupported attribute {name!r} "
                              f"(supported: {', '.join(allowed)})")
        if name in attrs:
            raise ConfigError(f"PKCS#11 URI: attribute {name!r} given twice")
        raw = urllib.parse.unquote_to_bytes(value)
        if name == "id":
            attrs[name] = raw
            continue
        try:
            attrs[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"PKCS#11 URI: {name} is not UTF-8") from None


def _check_key_attrs(attrs: dict[str, str | bytes]) -> str:
    """Refuse a URI that does not name one secret key through an absolute module path;
    return that module path."""
    if attrs.get("type", "secret-key") != "secret-key":
        raise ConfigError("PKCS#11 URI: a KEK is a secret-key object (type=secret-key)")
    module = str(attrs.get("module-path", ""))
    if not module:
        raise ConfigError("PKCS#11 URI: module-path is required, e.g. "
                          "?module-path=/usr/lib/softhsm/libsofthsm2.so")
    if not os.path.isabs(module):
        raise ConfigError(f"PKCS#11 URI: module-path must be absolute, got {module!r}")
    if not attrs.get("object") and not attrs.get("id"):
        raise ConfigError("PKCS#11 URI: name the key with object=LABEL (and/or id=)")
    return module


def _slot_id(attrs: dict[str, str | bytes]) -> int | None:
    if "slot-id" not in attrs:
        return None
    try:
        return int(str(attrs["slot-id"]))
    except ValueError:
        raise ConfigError("PKCS#11 URI: slot-id must be a number") from None


def _str(value: str | bytes | None) -> str | None:
    return value if isinstance(value, str) else None


def _check_pin_source(source: str) -> None:
    if source.startswith("env:") and len(source) > 4:
        return
    if source.startswith("file:"):
        path = _pin_file(source)
        if not os.path.isabs(path):
            raise ConfigError(f"PKCS#11 URI: pin-source file must be absolute, got {path!r}")
        return
    raise ConfigError("PKCS#11 URI: pin-source must be file:/absolute/path or env:NAME")


def _pin_file(source: str) -> str:
    rest = source[len("file:"):]
    if rest.startswith("//"):  # file:///abs/path (empty authority)
        rest = rest[2:]
    return rest


def read_pin(source: str | None) -> str | None:
    """The PIN named by a pin-source (None: no login, for tokens that need none)."""
    if source is None:
        return None
    if source.startswith("env:"):
        value = os.environ.get(source[4:])
        if value is None:
            raise ConfigError(f"PKCS#11 PIN: environment variable {source[4:]} is not set")
        return value
    path = Path(_pin_file(source))
    raw = secretfile.read_private(path, what="PKCS#11 PIN file", error=ConfigError)
    try:
        data = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: PKCS#11 PIN file is not UTF-8") from None
    pin = data.rstrip("\r\n")
    if not pin:
        raise ConfigError(f"{path}: PIN file is empty")
    return pin


# --------------------------------------------------------------------------- modules

class _Login:
    """This process's one logged-in session on one token."""

    def __init__(self, module: _Module, token: Any, pin: str | None) -> None:
        self.module = module
        self.token = token
        self.serial: bytes = token.serial
        self.refs = 0
        self.generation = 0
        self._pin_digest = self._digest(pin)
        self.session = self._open(pin)

    def _digest(self, pin: str | None) -> bytes | None:
        return None if pin is None else crypto.sha256(self.module.salt, pin.encode())

    def _open(self, pin: str | None) -> Any:
        p11 = self.module.p11
        try:
            return self.token.open(user_pin=pin)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
            raise KekLoginError(f"token {self.token.label!r} refused the PIN "
                                f"({type(exc).__name__})") from None
        except (p11.PinLocked, p11.PinExpired) as exc:
            raise KekLoginError(f"token {self.token.label!r}: the user PIN is "
                                f"{'locked' if isinstance(exc, p11.PinLocked) else 'expired'}"
                                ) from None
        except p11.UserPinNotInitialized:
            raise KekLoginError(f"token {self.token.label!r} has no user PIN "
                                f"(initialise it)") from None
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"cannot open a session on token {self.token.label!r}: "
                                 f"{type(exc).__name__}") from None

    def check_pin(self, pin: str | None) -> None:
        """A second provider on a token this process is logged into: PKCS#11 has no way to
        check its PIN without logging out the first, so compare with the PIN used."""
        if self._digest(pin) != self._pin_digest:
            raise KekLoginError(f"token {self.token.label!r}: this PIN differs from the "
                                f"one this process is logged in with")

    def reset(self, pin: str | None) -> None:
        """Reopen after the session was lost (caller holds the module lock)."""
        try:
            self.session.close()
        except self.module.p11.PKCS11Error:
            pass
        token = self.module.find_token(lambda t: t.serial == self.serial,
                                       f"serial={self.serial.decode(errors='replace')}")
        self.token = token
        self._pin_digest = self._digest(pin)
        self.session = self._open(pin)
        self.generation += 1

    def close(self) -> None:
        try:
            self.session.close()
        except self.module.p11.PKCS11Error:
            pass


class _Module:
    """One loaded PKCS#11 module: its lock and the tokens this process is logged into."""

    def __init__(self, path: str) -> None:
        self.p11 = _import()
        self.path = path
        self.lock = threading.RLock()
        self.salt = crypto.random_bytes(16)
        self.logins: dict[bytes, _Login] = {}
        if not os.path.exists(path):
            raise KekTokenNotFound(f"PKCS#11 module not found: {path} (is the HSM's "
                                   f"library installed? SoftHSM2: apt-get install softhsm2)")
        try:
            self.lib = self.p11.lib(path)
        except self.p11.PKCS11Error as exc:
            raise KekTokenNotFound(f"cannot load PKCS#11 module {path}: {exc}") from None

    def tokens(self) -> list[Any]:
        out = []
        for slot in self.lib.get_slots(token_present=True):
            try:
                out.append((slot.slot_id, slot.get_token()))
            except (self.p11.TokenNotPresent, self.p11.TokenNotRecognised):
                continue
        return out

    def find_token(self, match: Callable[[Any], bool], what: str,
                   slot_id: int | None = None) -> Any:
        found = [t for s, t in self.tokens() if match(t) and slot_id in (None, s)]
        if len(found) == 1:
            return found[0]
        labels = sorted(t.label for _, t in self.tokens()
                        if t.flags & self.p11.TokenFlag.TOKEN_INITIALIZED)
        if not found:
            raise KekTokenNotFound(f"no token matches {what} in {self.path} (tokens present: "
                                   f"{', '.join(repr(x) for x in labels) or 'none'})")
        raise KekTokenNotFound(f"{len(found)} tokens match {what} in {self.path}; add "
                               f"serial= to the URI")

    def login(self, uri: Pkcs11Uri) -> _Login:
        def match(t: Any) -> bool:
            return ((uri.token is None or t.label == uri.token)
                    and (uri.serial is None or t.serial.decode(errors="replace") == uri.serial)
                    and (uri.manufacturer is None or t.manufacturer_id == uri.manufacturer)
                    and (uri.model is None or t.model == uri.model))

        what = ", ".join(f"{k}={v!r}" for k, v in (
            ("token", uri.token), ("serial", uri.serial), ("manufacturer", uri.manufacturer),
            ("model", uri.model), ("slot-id", uri.slot_id)) if v is not None) or "any token"
        token = self.find_token(match, what, uri.slot_id)
        pin = read_pin(uri.pin_source)
        login = self.logins.get(token.serial)
        if login is None:
            login = _Login(self, token, pin)
            self.logins[token.serial] = login
        else:
            login.check_pin(pin)
        login.refs += 1
        return login

    def release(self, login: _Login) -> None:
        login.refs -= 1
        if login.refs <= 0 and self.logins.get(login.serial) is login:
            del self.logins[login.serial]
            login.close()


_modules: dict[str, _Module] = {}
_modules_lock = threading.Lock()


def _module(path: str) -> _Module:
    with _modules_lock:
        module = _modules.get(path)
        if module is None:
            module = _Module(path)
            _modules[path] = module
        return module


# --------------------------------------------------------------------------- the KEK

class Pkcs11Kek:
    """A :class:`~.kek_base.KekProvider` whose AES-256 KEK lives in a PKCS#11 token."""

    def __init__(self, uri: Pkcs11Uri | str) -> None:
        self.uri = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        self._module = _module(self.uri.module_path)
        self._closed = False
        with self._module.lock:
            self._login = self._module.login(self.uri)
            try:
                self._key, ident = self._find_key()
            except BaseException:
                self._module.release(self._login)
                raise
            self._generation = self._login.generation
        self.kek_id = "pkcs11:" + crypto.sha256(b"sealedtorch/kek-id/pkcs11/v1\x00", ident)[
            :8].hex()

    def __repr__(self) -> str:
        return f"Pkcs11Kek(kek_id={self.kek_id!r}, token={self.uri.token!r}, " \
               f"{self.uri.describe_key()})"

    # --- setup -------------------------------------------------------------------------
    def _find_key(self) -> tuple[Any, bytes]:
        p11 = self._module.p11
        session = self._login.session
        label = self._login.token.label
        try:
            key = session.get_key(object_class=p11.ObjectClass.SECRET_KEY,
                                  label=self.uri.object, id=self.uri.id)
        except p11.NoSuchKey:
            raise KekObjectNotFound(f"token {label!r} holds no secret key "
                                    f"{self.uri.describe_key()}") from None
        except p11.MultipleObjectsReturned:
            raise KekObjectNotFound(f"token {label!r} holds several secret keys "
                                    f"{self.uri.describe_key()}; add id= to the URI") from None
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"cannot search token {label!r}: {type(exc).__name__}"
                                 ) from None
        A = p11.Attribute
        try:
            key_type, length = key[A.KEY_TYPE], key[A.VALUE_LEN]
            sensitive, extractable = key[A.SENSITIVE], key[A.EXTRACTABLE]
            can = key[A.ENCRYPT] and key[A.DECRYPT]
            ident = bytes(key[A.ID] or b"")
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"cannot read the attributes of key "
                                 f"{self.uri.describe_key()}: {type(exc).__name__}") from None
        where = f"key {self.uri.describe_key()} on token {label!r}"
        if key_type != p11.KeyType.AES or length != crypto.KEY_SIZE:
            raise KekUnavailable(f"{where} is not an AES-256 key")
        if not sensitive or extractable:
            raise KekUnavailable(f"{where} is extractable or not sensitive: a KEK must never "
                                 f"leave the token (make one with `sealedtorch keyserver kek "
                                 f"create`)")
        if not can:
            raise KekUnavailable(f"{where} is not allowed to encrypt and decrypt")
        mechanisms = self._login.token.slot.get_mechanisms()
        if p11.Mechanism.AES_GCM not in mechanisms:
            raise KekUnavailable(f"token {label!r} does not offer CKM_AES_GCM")
        try:
            check = bytes(key[A.CHECK_VALUE] or b"")
        except p11.PKCS11Error:
            check = b""
        identity = b"\x00".join([self._login.serial, (self.uri.object or "").encode(), ident,
                                 check])
        return key, identity

    @classmethod
    def create(cls, uri: Pkcs11Uri | str) -> Pkcs11Kek:
        """Generate the URI's key in the token: AES-256, sensitive, never extractable,
        encrypt/decrypt only.  Refuses if a secret key with that label or id exists."""
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        if parsed.object is None:
            raise ConfigError("kek create: the URI needs object=LABEL")
        module = _module(parsed.module_path)
        p11 = module.p11
        with module.lock:
            login = module.login(parsed)
            try:
                session = login.session
                for attrs in ({p11.Attribute.LABEL: parsed.object},
                              {p11.Attribute.ID: parsed.id} if parsed.id else None):
                    if attrs is None:
                        continue
                    attrs[p11.Attribute.CLASS] = p11.ObjectClass.SECRET_KEY
                    if list(session.get_objects(attrs)):
                        raise ConfigError(f"token {login.token.label!r} already holds a secret "
                                          f"key {parsed.describe_key()}; refusing to create "
                                          f"another")
                A = p11.Attribute
                rw = login.token.open(rw=True)  # shares the login; closing it keeps it
                try:
                    rw.generate_key(
                        p11.KeyType.AES, crypto.KEY_SIZE * 8, label=parsed.object,
                        id=parsed.id or crypto.random_bytes(8), store=True,
                        capabilities=p11.MechanismFlag.ENCRYPT | p11.MechanismFlag.DECRYPT,
                        template={A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True,
                                  A.EXTRACTABLE: False, A.MODIFIABLE: False,
                                  A.WRAP: False, A.UNWRAP: False, A.SIGN: False,
                                  A.VERIFY: False, A.DERIVE: False})
                except p11.PKCS11Error as exc:
                    raise KekUnavailable(f"token {login.token.label!r} could not generate "
                                         f"the key: {type(exc).__name__}") from None
                finally:
                    rw.close()
            finally:
                module.release(login)
        return cls(parsed)

    # --- operations --------------------------------------------------------------------
    def _call(self, op: Callable[[Any], T], what: str) -> T:
        p11 = self._module.p11
        lost = (p11.SessionHandleInvalid, p11.SessionClosed, p11.DeviceRemoved,
                p11.TokenNotPresent, p11.UserNotLoggedIn, p11.ObjectHandleInvalid,
                p11.KeyHandleInvalid, p11.DeviceError)
        with self._module.lock:
            if self._closed:
                raise KekUnavailable(f"{self.kek_id}: provider is closed")
            for attempt in (1, 2):
                try:
                    if self._generation != self._login.generation:
                        self._key, _ = self._find_key()
                        self._generation = self._login.generation
                    return op(self._key)
                except lost as exc:
                    if attempt == 2:
                        raise KekUnavailable(f"{self.kek_id}: token unusable during {what}: "
                                             f"{type(exc).__name__}") from None
                    self._login.reset(read_pin(self.uri.pin_source))
        raise AssertionError("unreachable")

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes:
        p11 = self._module.p11
        iv = crypto.random_bytes(crypto.NONCE_SIZE)
        params = p11.GCMParams(iv, key_aad(model_id, version), _TAG_BITS)
        try:
            ciphertext = self._call(lambda k: k.encrypt(key, mechanism=p11.Mechanism.AES_GCM,
                                                        mechanism_param=params), "wrap")
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"{self.kek_id}: the token refused to wrap: "
                                 f"{type(exc).__name__}") from None
        return iv + bytes(ciphertext)

    def wrap_with_id(self, key: bytes, *, model_id: str, version: int) -> tuple[bytes, str]:
        return self.wrap(key, model_id=model_id, version=version), self.kek_id

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int,
               kek_id: str | None = None) -> bytes:
        check_kek_id(self, kek_id)
        if len(wrapped) != crypto.NONCE_SIZE + crypto.KEY_SIZE + crypto.TAG_SIZE:
            raise IntegrityError("wrapped key has the wrong length")
        plain = self._gcm_open(wrapped, key_aad(model_id, version), "unwrap", "unwrap")
        if plain is None:
            raise IntegrityError("wrapped key (wrong KEK or tampered record): "
                                 "authentication failed in the token")
        if len(plain) != crypto.KEY_SIZE:
            raise IntegrityError("unwrapped key has the wrong length")
        return bytes(plain)

    def mac(self, data: bytes) -> bytes:
        """GMAC in the token: AES-GCM of an empty plaintext with ``data`` as associated
        data under a fresh random IV; the tag is IV ‖ 128-bit GCM tag.  (The KEK object is
        made encrypt/decrypt only, so a MAC with the KEK itself is GCM's tag; verifying is
        a decryption that the token refuses when the tag does not match.)"""
        p11 = self._module.p11
        iv = crypto.random_bytes(crypto.NONCE_SIZE)
        params = p11.GCMParams(iv, data, _TAG_BITS)
        try:
            tag = self._call(lambda k: k.encrypt(b"", mechanism=p11.Mechanism.AES_GCM,
                                                 mechanism_param=params), "mac")
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"{self.kek_id}: the token refused to MAC: "
                                 f"{type(exc).__name__}") from None
        return iv + bytes(tag)

    def verify_mac(self, data: bytes, tag: bytes) -> bool:
        if len(tag) != crypto.NONCE_SIZE + crypto.TAG_SIZE:
            return False
        plain = self._gcm_open(tag, data, "verify mac", "verify a MAC")
        return plain is not None and len(plain) == 0

    def _gcm_open(self, sealed: bytes, aad: bytes, op: str, refused: str) -> bytes | None:
        """AES-GCM decryption in the token of ``sealed`` (IV ‖ ciphertext ‖ tag) with
        ``aad``: the plaintext, or None if the tag does not authenticate.  Any other refusal
        of the token is :class:`KekUnavailable` ("the token refused to ``refused``")."""
        p11 = self._module.p11
        params = p11.GCMParams(sealed[:crypto.NONCE_SIZE], aad, _TAG_BITS)
        body = sealed[crypto.NONCE_SIZE:]
        try:
            return bytes(self._call(lambda k: k.decrypt(body, mechanism=p11.Mechanism.AES_GCM,
                                                        mechanism_param=params), op))
        except (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.DataInvalid,
                p11.GeneralError, p11.FunctionFailed):
            # SoftHSM2 answers a failed GCM tag check with CKR_GENERAL_ERROR
            return None
        except p11.PKCS11Error as exc:
            raise KekUnavailable(f"{self.kek_id}: the token refused to {refused}: "
                                 f"{type(exc).__name__}") from None

    def close(self) -> None:
        with self._module.lock:
            if not self._closed:
                self._closed = True
                self._module.release(self._login)
