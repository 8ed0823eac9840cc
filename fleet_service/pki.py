"""The fleet PKI: the CA, server and client certificates, device CSR signing, key files on disk.

Every key the fleet makes is ECDSA P-256 (small, fast on a Raspberry Pi, supported by every TLS
stack Mosquitto and the agents use); the one exception is the Ed25519 key that signs model
manifests. Devices make their own keys and send a CSR, so their private keys never leave them;
:func:`sign_device_csr` decides what the certificate says, not the device.

Errors::

    ValueError
     └── CsrRejectedError   a device's CSR is unusable; the message says what to send instead
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_protocol import ca_fingerprint, validate_device_id
from fleet_service.files import replace_atomically

__all__ = [
    "CLOCK_SKEW",
    "MIN_RSA_BITS",
    "CsrRejectedError",
    "Revocation",
    "build_crl",
    "certificate_fingerprint",
    "create_ca",
    "generate_signing_key",
    "issue_client_cert",
    "issue_server_cert",
    "load_certificate",
    "load_crl",
    "load_private_key",
    "load_signing_key",
    "load_signing_public_key",
    "private_key_is_private",
    "public_key_fingerprint",
    "sign_device_csr",
    "write_certificate",
    "write_crl",
    "write_private_key",
    "write_public_key",
]

logger = logging.getLogger(__name__)

# Certificates start this far in the past: a device whose clock runs a little behind the control
# plane's must still accept a certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)

# Below 2048 bits RSA is factorable by a determined attacker; NIST has disallowed it since 2013.
MIN_RSA_BITS = 2048

# The curves a device key may use: what OpenSSL on every supported platform offers for TLS 1.2.
_DEVICE_CURVES = (ec.SECP256R1, ec.SECP384R1)

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


class CsrRejectedError(ValueError):
    """A device's certificate signing request cannot be signed; the message says why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _check_ca(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
    # Signing with the wrong key yields certificates nobody can verify; fail at the cause instead.
    if ca_key.public_key().public_numbers() != _ec_public(ca_cert).public_numbers():
        name = ca_cert.subject.rfc4514_string()
        raise ValueError(
            f"the CA key does not belong to the CA certificate {name!r}; "
            "load the ca.key written next to this ca.crt"
        )


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"certificate {cert.subject.rfc4514_string()!r} holds a {type(key).__name__}; "
            "the fleet CA is ECDSA: recreate it with `edgefleet init`"
        )
    return key


def _validity(
    ca_cert: x509.Certificate | None, valid_days: int | dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    # A timedelta is a short device-certificate lifetime (ServiceSettings.device_cert_ttl_s).
    if isinstance(valid_days, dt.timedelta):
        lifetime = valid_days
        if lifetime <= dt.timedelta(0):
            raise ValueError(f"a certificate lifetime must be positive, got {lifetime}")
    elif valid_days < 1:
        raise ValueError(f"valid_days must be at least 1, got {valid_days}")
    else:
        lifetime = dt.timedelta(days=valid_days)
    now = _now()
    # Backdated by at most a tenth of the lifetime: agents time renewal from not_before, and a
    # short-lived certificate must not spend most of its life in the past.
    start = now - min(CLOCK_SKEW, lifetime / 10)
    end = now + lifetime
    # A leaf that outlives its CA would be rejected anyway; say so in the leaf itself.
    if ca_cert is not None:
        end = min(end, ca_cert.not_valid_after_utc)
    return start, end


def _leaf_builder(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: PublicKeyTypes,
    valid_days: int | dt.timedelta,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    _check_ca(ca_key, ca_cert)
    start, end = _validity(ca_cert, valid_days)
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TypeError(f"cannot certify a {type(public_key).__name__}; use an EC or RSA key")
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA TLS 1.2 key transport needs it; harmless for EC keys.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )


def create_ca(
    common_name: str = "edgefleet fleet CA", valid_days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed fleet CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(None, valid_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    logger.info("created fleet CA %r, fingerprint %s", common_name, certificate_fingerprint(cert))
    return key, cert


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hostnames: Sequence[str],
    ip_addresses: Sequence[str],
    valid_days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the broker and the HTTPS API, valid for every name given.

    825 days is the longest lifetime Apple platforms accept for a server certificate.
    """
    if not hostnames and not ip_addresses:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    try:
        ips = [ip_address(ip) for ip in ip_addresses]
    except ValueError as exc:
        raise ValueError(f"invalid IP address for the server certificate: {exc}") from exc
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ip) for ip in ips]
    common_name = hostnames[0] if hostnames else str(ips[0])
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _leaf_builder(
            ca_key, ca_cert, subject, key.public_key(), valid_days, ExtendedKeyUsageOID.SERVER_AUTH
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    valid_days: int | dt.timedelta = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS client certificate whose CN is the MQTT identity (the service's, an integration's).

    ``valid_days`` may be a timedelta: a single-use certificate lives minutes.
    """
    if (
        not common_name
        or any(c in common_name for c in "+#/")
        or any(c.isspace() for c in common_name)
    ):
        raise ValueError(
            f"invalid client identity {common_name!r}: the CN becomes an MQTT username and must "
            "be non-empty without whitespace, '+', '#' or '/'"
        )
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = _leaf_builder(
        ca_key, ca_cert, subject, key.public_key(), valid_days, ExtendedKeyUsageOID.CLIENT_AUTH
    ).sign(ca_key, hashes.SHA256())
    return key, cert


def _check_csr_key(key: PublicKeyTypes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _DEVICE_CURVES):
            raise CsrRejectedError(
                f"the CSR's EC key uses curve {key.curve.name}; make the device key on "
                "P-256 (secp256r1) or P-384"
            )
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrRejectedError(
                f"the CSR's RSA key has {key.key_size} bits; use at least {MIN_RSA_BITS} "
                "bits, or better an EC P-256 key"
            )
        return key
    raise CsrRejectedError(
        f"the CSR's key is {type(key).__name__}, which the broker's TLS clients do not all "
        "support; make the device key EC P-256"
    )


def sign_device_csr(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr_pem: bytes,
    device_id: str,
    valid_days: int | dt.timedelta = 365,
) -> x509.Certificate:
    """Certify the key in a device's CSR as ``device_id`` (the CN, hence its MQTT identity).

    ``valid_days`` may be a timedelta for lifetimes shorter than a day (certificate rotation).

    Only the CSR's public key is used: the service decides the subject and every extension, so a
    CSR that asks for any (a name, SANs, CA rights) is refused rather than silently edited.
    Raises :class:`CsrRejectedError`.
    """
    validate_device_id(device_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrRejectedError(
            "the CSR is not a PEM certificate signing request "
            "('-----BEGIN CERTIFICATE REQUEST-----'); send the PEM text the agent generated"
        ) from exc
    try:
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejectedError(f"the CSR's key or signature cannot be read: {exc}") from exc
    key = _check_csr_key(public_key)
    if not signature_ok:
        raise CsrRejectedError(
            "the CSR's signature does not match its key (damaged or edited in transit); "
            "generate the CSR again on the device"
        )
    if len(csr.subject) > 0:
        raise CsrRejectedError(
            f"the CSR names a subject ({csr.subject.rfc4514_string()}); send a CSR with an "
            "empty subject; the service assigns the device id"
        )
    try:
        requested = [ext.oid.dotted_string for ext in csr.extensions]
    except ValueError as exc:
        raise CsrRejectedError(f"the CSR's extensions cannot be parsed: {exc}") from exc
    if requested:
        raise CsrRejectedError(
            f"the CSR requests extensions {requested}; send a CSR without extensions, the "
            "service decides what a device certificate allows"
        )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    cert = _leaf_builder(
        ca_key, ca_cert, subject, key, valid_days, ExtendedKeyUsageOID.CLIENT_AUTH
    ).sign(ca_key, hashes.SHA256())
    logger.info("signed device certificate for %s, serial %x", device_id, cert.serial_number)
    return cert


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate as the CRL lists it."""

    serial: int
    revoked_at: dt.datetime


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[Revocation],
    *,
    lifetime: dt.timedelta,
) -> x509.CertificateRevocationList:
    """A CRL signed by the fleet CA listing ``revoked``, valid for ``lifetime`` from now.

    Past its nextUpdate OpenSSL (hence mosquitto) refuses *every* client of the CA, so whoever
    keeps the CRL must sign a new one well before then (fleet_service/broker_policy.py).
    """
    _check_ca(ca_key, ca_cert)
    if lifetime <= dt.timedelta(0):
        raise ValueError(f"a CRL lifetime must be positive, got {lifetime}")
    now = _now()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        # Back-dated like certificates, for readers whose clock runs a little behind.
        .last_update(now - CLOCK_SKEW)
        .next_update(now + lifetime)
        # Milliseconds since the epoch: rises with every CRL without a counter to store.
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    for entry in sorted(revoked, key=lambda r: r.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Write ``crl`` as PEM, mode 0644 (mosquitto reads it), replacing the old one atomically.

    Atomic matters twice over: mosquitto 2.0.11 re-reading a half-written CRL would refuse
    everyone, and one re-reading a missing CRL stops checking revocation altogether.
    """
    _write_public(path, crl.public_bytes(serialization.Encoding.PEM))


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """Read a PEM CRL."""
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM CRL ({exc})") from exc


def public_key_fingerprint(key: PublicKeyTypes) -> str:
    """``sha256:<hex>`` of a public key's SubjectPublicKeyInfo DER: the same key, whatever cert."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER, the form join tokens pin the CA by."""
    return ca_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    """A new Ed25519 key for signing model manifests."""
    return ed25519.Ed25519PrivateKey.generate()


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a new file that only its owner can read.

    The file is created 0600 in the same call that creates it (no window where it is readable),
    and an existing file is never replaced: raises :class:`FileExistsError`, since overwriting a
    key silently orphans every certificate issued for it.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(path)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A half-written key would be refused later with a confusing parse error.
        path.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    # Replace atomically: a reader (mosquitto on SIGHUP) never sees a half-written certificate.
    replace_atomically(Path(path), data, _PUBLIC_MODE)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write ``cert`` as PEM, mode 0644, replacing any previous certificate atomically."""
    _write_public(path, cert.public_bytes(serialization.Encoding.PEM))


def write_public_key(path: Path, key: PublicKeyTypes) -> None:
    """Write a public key (e.g. the manifest signing key's) as SubjectPublicKeyInfo PEM, 0644."""
    _write_public(
        path,
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"{path} is not an unencrypted PEM private key ({exc}); "
            "point to the .key file `edgefleet init` wrote"
        ) from exc


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an ECDSA private key (the CA's, the server's, a client's) from a PEM file."""
    key = _load_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{path} holds a {type(key).__name__}; the fleet PKI uses ECDSA P-256 keys"
        )
    return key


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read the Ed25519 manifest signing key."""
    key = _load_key(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; manifests are signed with Ed25519")
    return key


def load_signing_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """Read the Ed25519 public key that verifies model manifests."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not a PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; manifests are signed with Ed25519")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate ({exc})") from exc


def private_key_is_private(path: Path) -> bool:
    """True when no one but the file's owner can read or write it (no group/other bits)."""
    return Path(path).stat().st_mode & 0o077 == 0
