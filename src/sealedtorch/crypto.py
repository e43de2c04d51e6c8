"""The only module that touches cryptographic primitives.

Everything else in sealedtorch calls the small recipes below, so the choice of algorithms,
nonce construction and error translation lives in one reviewable place.  Failures of
authenticated decryption are translated into :class:`~sealedtorch.errors.IntegrityError`
here, so no caller can accidentally swallow ``InvalidTag`` or see a different type.

Algorithms (fixed, no negotiation):
- bulk data and key wrapping: AES-256-GCM, 96-bit nonces, 128-bit tags;
- key derivation: HKDF-SHA256;
- keys in transit: HPKE base mode (RFC 9180) with DHKEM(X25519, HKDF-SHA256),
  HKDF-SHA256 and AES-256-GCM;
- signatures: Ed25519 (sim platform keys, tokens, keycache answers over a length-prefixed
  transcript).

Vendor attestation (SEV-SNP reports, AMD and Intel certificates) uses the vendors' fixed
algorithms; their primitives are here too: ECDSA P-384/SHA-384 over a raw ``r``/``s``
report signature, X.509 issuer signatures of certificates and CRLs (RSA-PSS/SHA-384 for
AMD), the algorithm and key-type checks of a certificate, and its DER encoding and SHA-256
fingerprint.  What is *not* here is X.509 structure: parsing certificates and CRLs
(``cryptography.x509``), reading names and extensions, choosing issuers and pinning roots.
That is chain logic, owned by :mod:`sealedtorch.attest.snp` and the DCAP collateral
modules, which call the functions below for every signature, digest and key check; no
module but this one imports ``cryptography.hazmat``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AttestationError, IntegrityError

if TYPE_CHECKING:
    from cryptography import x509

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
X25519_PUBLIC_KEY_SIZE = 32
ED25519_PUBLIC_KEY_SIZE = 32

_HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def random_bytes(n: int) -> bytes:
    """Bytes from the OS CSPRNG (nonces, salts, keys)."""
    return os.urandom(n)


def generate_key() -> bytes:
    """A fresh 256-bit symmetric key (model keys, KEKs)."""
    return os.urandom(KEY_SIZE)


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> bytes:
    """SHA-256 of a whole file, read in chunks (sealed files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def sha384(*parts: bytes) -> bytes:
    h = hashlib.sha384()
    for p in parts:
        h.update(p)
    return h.digest()


def sha512(*parts: bytes) -> bytes:
    h = hashlib.sha512()
    for p in parts:
        h.update(p)
    return h.digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets and MACs without leaking where they differ."""
    return hmac.compare_digest(a, b)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104): the keyserver's row MACs under a file KEK's derived key."""
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """Derive a sub-key; ``info`` names its purpose so keys never cross purposes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def counter_nonce(counter: int) -> bytes:
    """96-bit big-endian counter nonce; only safe under a key used for one file/stream."""
    if not 0 <= counter < 2**96:
        raise ValueError("nonce counter out of range")
    return counter.to_bytes(NONCE_SIZE, "big")


@dataclass
class Aead:
    """AES-256-GCM under one key, with in-place helpers for bulk tensor data.

    ``decrypt_into`` writes plaintext straight into caller memory (a tensor's storage);
    with ``cryptography`` >= 50 it releases the GIL, so several threads decrypt in parallel.
    """

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(self.key)

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def encrypt_into(self, nonce: bytes, plaintext: memoryview | bytes, aad: bytes,
                     out: memoryview | bytearray) -> None:
        """Encrypt into ``out`` (len(plaintext) + 16 bytes: ciphertext then tag)."""
        self._aead.encrypt_into(nonce, plaintext, aad, out)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes, *, what: str) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed") from None

    def decrypt_into(self, nonce: bytes, ciphertext: memoryview | bytes, aad: bytes,
                     out: memoryview | bytearray, *, what: str) -> None:
        """Decrypt into ``out``; on failure ``out`` is zeroed before raising."""
        try:
            self._aead.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            zero(out)
            raise IntegrityError(f"{what}: authentication failed") from None


def zero(buf: memoryview | bytearray) -> None:
    """Best-effort wipe of a mutable buffer (Python cannot wipe immutable ``bytes``)."""
    mv = memoryview(buf).cast("B")
    mv[:] = bytes(len(mv))


# --- legacy import (sgx-pytorch) ------------------------------------------------------

LEGACY_SGX_PYTORCH_KEY_SIZE = 16
LEGACY_SGX_PYTORCH_IV_SIZE = 12


def legacy_sgx_pytorch_decrypt(key: bytes, iv: bytes, ciphertext: bytes, tag: bytes, *,
                               what: str) -> bytes:
    """Open one buffer written by sgx-pytorch's ``to_secure_mkldnn``: AES-128-GCM, no AAD.

    Only the importer calls this, once, to migrate old checkpoints; nothing sealedtorch
    writes uses AES-128 or an empty AAD.  A wrong key or any modified byte raises
    :class:`IntegrityError` naming ``what``.
    """
    if len(key) != LEGACY_SGX_PYTORCH_KEY_SIZE:
        raise ValueError("sgx-pytorch keys are 16 bytes (AES-128)")
    if len(iv) != LEGACY_SGX_PYTORCH_IV_SIZE or len(tag) != TAG_SIZE:
        raise ValueError("sgx-pytorch buffers carry a 12-byte IV and a 16-byte tag")
    try:
        return AESGCM(key).decrypt(iv, ciphertext + tag, None)
    except InvalidTag:
        raise IntegrityError(f"{what}: authentication failed (wrong key, or the buffer was "
                             "modified)") from None


# --- key wrapping (KEK) ----------------------------------------------------------------

def wrap_key(kek: bytes, key: bytes, aad: bytes) -> bytes:
    """Wrap ``key`` under ``kek``: nonce ‖ AES-256-GCM(key, aad)."""
    nonce = random_bytes(NONCE_SIZE)
    return nonce + Aead(kek).encrypt(nonce, key, aad)


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    if len(wrapped) != NONCE_SIZE + KEY_SIZE + TAG_SIZE:
        raise IntegrityError("wrapped key has the wrong length")
    return Aead(kek).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], aad,
                             what="wrapped key (wrong KEK or tampered record)")


# --- HPKE (keys in transit) ------------------------------------------------------------

@dataclass
class EphemeralKeyPair:
    """An X25519 key pair that lives only in this process, for receiving HPKE-sealed keys."""

    private_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> EphemeralKeyPair:
        return cls(X25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def open(self, sealed: bytes, *, info: bytes) -> bytes:
        """Open an HPKE ciphertext addressed to this key pair."""
        try:
            return _HPKE_SUITE.decrypt(sealed, self.private_key, info=info)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                "HPKE open failed: the sealed key was not addressed to this key pair, "
                "was modified, or is bound to different context") from None


def hpke_seal(recipient_public_key: bytes, plaintext: bytes, *, info: bytes) -> bytes:
    """HPKE base-mode seal to a raw X25519 public key; returns enc ‖ ciphertext."""
    if len(recipient_public_key) != X25519_PUBLIC_KEY_SIZE:
        raise ValueError("X25519 public key must be 32 bytes")
    pk = X25519PublicKey.from_public_bytes(recipient_public_key)
    return _HPKE_SUITE.encrypt(plaintext, pk, info=info)


# --- Ed25519 ---------------------------------------------------------------------------

@dataclass
class SigningKey:
    """An Ed25519 signing key (sim platform key, token-signing key)."""

    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def ed25519_from_seed(seed: bytes) -> SigningKey:
    """An Ed25519 signing key from its 32-byte RFC 8032 seed (the private key encoding of
    C2SP signed-note signer keys)."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


def ed25519_seed(key: SigningKey) -> bytes:
    """The 32-byte RFC 8032 seed of a signing key (for writing a signer key file)."""
    return key.private_key.private_bytes(serialization.Encoding.Raw,
                                         serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())


# --- Merkle tree hashing (RFC 9162 §2.1.1, the transparency log) ------------------------

MERKLE_HASH_SIZE = 32


def merkle_leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 ‖ data).  The prefix keeps a leaf from ever being
    taken for an interior node (second-preimage defence)."""
    return hashlib.sha256(b"\x00" + data).digest()


def merkle_node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def load_ed25519_public(data: bytes) -> bytes:
    """Accept a PEM SubjectPublicKeyInfo or 32 raw bytes; return the raw public key."""
    if len(data) == ED25519_PUBLIC_KEY_SIZE:
        return bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def require_ed25519(public_key: bytes, signature: bytes, message: bytes, *, what: str) -> None:
    """Verify or raise AttestationError naming ``what`` was not signed correctly."""
    if not ed25519_verify(public_key, signature, message):
        raise AttestationError(f"{what}: signature does not verify")


def transcript(label: bytes, *parts: bytes) -> bytes:
    """An injective encoding of ``parts`` under ``label``, for signing several fields at once:
    ``label ‖ 0 ‖ (u32be(len(part)) ‖ part)*``.  The length prefixes mean no two different
    field lists encode to the same bytes, so a signature over one answer can never be read
    as a signature over another (fields shifted between model id, nonce, key, ...)."""
    out = bytearray(label)
    out.append(0)
    for part in parts:
        data = bytes(part)
        if len(data) >= 1 << 32:
            raise ValueError("transcript part too long")
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def sign_transcript(key: SigningKey, label: bytes, *parts: bytes) -> bytes:
    """Ed25519 signature over :func:`transcript` (``label``, ``parts``)."""
    return key.sign(transcript(label, *parts))


def verify_transcript(public_key: bytes, signature: bytes, label: bytes, *parts: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature over the transcript."""
    if len(public_key) != ED25519_PUBLIC_KEY_SIZE or len(signature) != 64:
        return False
    return ed25519_verify(public_key, signature, transcript(label, *parts))


# --- ECDSA P-384 and X.509 issuer signatures (SEV-SNP reports and AMD certificates) -----

def verify_ecdsa_p384_sha384(public_key: object, r: int, s: int, message: bytes) -> bool:
    """True iff ``(r, s)`` is a valid ECDSA P-384 / SHA-384 signature over ``message``.

    ``public_key`` is an ``EllipticCurvePublicKey`` on P-384 or an uncompressed SEC1 point.
    Never raises for malformed input (wrong curve, r or s out of range): it returns False.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        if isinstance(public_key, bytes | bytearray):
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), bytes(public_key))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            key = public_key
        else:
            return False
        if not isinstance(key.curve, ec.SECP384R1) or r <= 0 or s <= 0:
            return False
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, TypeError, OverflowError):
        return False
    return True


def cert_signed_by(cert: object, issuer: object) -> bool:
    """True iff X.509 ``cert`` names ``issuer``'s subject as its issuer and its signature
    verifies under ``issuer``'s public key (with the algorithm and, for RSA-PSS, the
    parameters the certificate declares).  Never raises: anything malformed is False."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    if not isinstance(cert, x509.Certificate) or not isinstance(issuer, x509.Certificate):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def crl_signed_by(crl: object, issuer: object) -> bool:
    """True iff X.509 CRL ``crl`` names ``issuer``'s subject as its issuer and its signature
    verifies under ``issuer``'s public key (RSA-PSS parameters as the CRL declares them).
    Never raises: anything malformed is False."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if not isinstance(crl, x509.CertificateRevocationList) \
            or not isinstance(issuer, x509.Certificate):
        return False
    try:
        if crl.issuer != issuer.subject:
            return False
        key = issuer.public_key()
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return False
        return bool(crl.is_signature_valid(key))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False


def certificate_der(cert: x509.Certificate) -> bytes:
    """The DER encoding of an X.509 certificate (what fingerprints and pins are over)."""
    return cert.public_bytes(serialization.Encoding.DER)


def crl_der(crl: x509.CertificateRevocationList) -> bytes:
    """The DER encoding of an X.509 CRL."""
    return crl.public_bytes(serialization.Encoding.DER)


def certificate_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def signed_with_rsa_pss_sha384(cert: x509.Certificate) -> bool:
    """True iff the certificate declares an RSA-PSS signature with SHA-384 (AMD's choice for
    every certificate of an SEV-SNP chain).  Never raises: an algorithm ``cryptography``
    does not support is not this one."""
    from cryptography.x509.oid import SignatureAlgorithmOID

    try:
        return (cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
                and isinstance(cert.signature_hash_algorithm, hashes.SHA384))
    except Exception:  # an unsupported algorithm raises; either way it is not ours
        return False


def holds_rsa_key(cert: x509.Certificate) -> bool:
    """True iff the certificate's subject public key is an RSA key."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return isinstance(cert.public_key(), rsa.RSAPublicKey)


def holds_ecdsa_p384_key(cert: x509.Certificate) -> bool:
    """True iff the certificate's subject public key is an ECDSA key on P-384."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


# --- X.509 for the keyserver's TLS (a private CA and one server certificate) ----------

def generate_tls_ca(common_name: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 CA for one deployment: (certificate PEM, key PEM).

    Clients pin this CA (``--ca``) instead of trusting the web PKI, so a keyserver needs no
    public certificate.  The key is PKCS#8 PEM, unencrypted: store it 0600.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def issue_tls_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, *, common_name: str,
                          dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
                          days: int = 825) -> tuple[bytes, bytes]:
    """An ECDSA P-256 TLS server certificate signed by the CA: (certificate PEM, key PEM).

    Subject alternative names are exactly ``dns_names`` and ``ip_addresses`` (clients match
    the host they dial against these, never against the common name).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an ECDSA key")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if not sans:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def tls_certificate_spki(certificate: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate given as PEM or DER.

    This is what a TLS server's attestation evidence binds and what its clients pin: the
    public key, not the certificate, so a re-issued certificate for the same key still
    matches and any other key does not.
    """
    from cryptography import x509

    data = bytes(certificate)
    try:
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data))
    except ValueError as exc:
        raise ValueError(f"not an X.509 certificate: {exc}") from None
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
