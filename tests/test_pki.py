"""The fleet PKI: what each certificate allows, which device CSRs are refused, key file modes."""

from __future__ import annotations

import datetime as dt
import stat
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_protocol import ca_fingerprint
from fleet_service.pki import (
    CsrRejectedError,
    certificate_fingerprint,
    create_ca,
    generate_signing_key,
    issue_client_cert,
    issue_server_cert,
    load_certificate,
    load_private_key,
    load_signing_key,
    load_signing_public_key,
    private_key_is_private,
    sign_device_csr,
    write_certificate,
    write_private_key,
    write_public_key,
)

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
E = TypeVar("E", bound=x509.ExtensionType)
NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
DEVICE_ID = "dev-0123456789ab"


@pytest.fixture(scope="module")
def ca() -> CA:
    return create_ca("test fleet CA")


def ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def is_critical(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    return cert.extensions.get_extension_for_class(kind).critical


def csr_pem(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    subject: x509.Name | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    cert.verify_directly_issued_by(ca_cert)


def test_ca_may_sign_leaf_certificates_only(ca: CA) -> None:
    key, cert = ca
    assert is_critical(cert, x509.BasicConstraints)
    assert ext(cert, x509.BasicConstraints) == x509.BasicConstraints(ca=True, path_length=0)
    usage = ext(cert, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert ext(cert, x509.SubjectKeyIdentifier) == ski
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    verify_issued_by(cert, cert)


def test_fingerprint_is_the_join_token_form_of_the_ca(ca: CA) -> None:
    _, cert = ca
    fingerprint = certificate_fingerprint(cert)
    assert fingerprint == ca_fingerprint(cert.public_bytes(serialization.Encoding.DER))
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64


def test_server_certificate_names_every_host_and_address(ca: CA) -> None:
    ca_key, ca_cert = ca
    key, cert = issue_server_cert(
        ca_key, ca_cert, hostnames=["broker.local", "localhost"], ip_addresses=["127.0.0.1"]
    )
    verify_issued_by(cert, ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "broker.local"
    sans = ext(cert, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["broker.local", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.BasicConstraints) == NOT_CA
    assert isinstance(key.curve, ec.SECP256R1)


def test_client_certificate_carries_the_identity_for_client_auth_only(ca: CA) -> None:
    ca_key, ca_cert = ca
    _, cert = issue_client_cert(ca_key, ca_cert, "edgefleet-service")
    verify_issued_by(cert, ca_cert)
    assert cert.subject.rfc4514_string() == "CN=edgefleet-service"
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_certificates_never_outlive_the_ca(ca: CA) -> None:
    ca_key, ca_cert = ca
    _, cert = issue_client_cert(ca_key, ca_cert, "long-lived", valid_days=10_000)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_signing_with_a_key_that_is_not_the_cas_is_refused(ca: CA) -> None:
    _, ca_cert = ca
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        issue_client_cert(ec.generate_private_key(ec.SECP256R1()), ca_cert, "someone")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(rsa.generate_private_key(65537, 2048), id="rsa-2048"),
    ],
)
def test_device_csr_is_signed_with_the_service_assigned_identity(
    ca: CA, key: CertificateIssuerPrivateKeyTypes
) -> None:
    ca_key, ca_cert = ca
    cert = sign_device_csr(ca_key, ca_cert, csr_pem(key), DEVICE_ID)
    verify_issued_by(cert, ca_cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == f"CN={DEVICE_ID}"
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert is_critical(cert, x509.BasicConstraints)
    assert ext(cert, x509.BasicConstraints) == NOT_CA
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    assert ext(cert, x509.AuthorityKeyIdentifier).key_identifier == ca_ski.digest
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > dt.timedelta(days=364)


def tampered(pem: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped: it still parses."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the DER is the last byte of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def p256_csr(**kwargs: object) -> bytes:
    return csr_pem(ec.generate_private_key(ec.SECP256R1()), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        pytest.param(b"not a csr", "not a PEM certificate signing request", id="garbage"),
        pytest.param(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM certificate signing request",
            id="damaged-pem",
        ),
        pytest.param(tampered(p256_csr()), "signature does not match", id="tampered"),
        pytest.param(
            # A deliberately weak key: the point is that it gets refused.
            csr_pem(rsa.generate_private_key(65537, 1024)),  # noqa: S505
            "1024 bits",
            id="rsa-1024",
        ),
        pytest.param(
            csr_pem(ed25519.Ed25519PrivateKey.generate()), "Ed25519PublicKey", id="ed25519"
        ),
        pytest.param(csr_pem(ec.generate_private_key(ec.SECP521R1())), "secp521r1", id="ec-p521"),
        pytest.param(
            p256_csr(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-other")])),
            "send a CSR with an empty subject; the service assigns the device id",
            id="subject-cn",
        ),
        pytest.param(
            p256_csr(extensions=[x509.SubjectAlternativeName([x509.DNSName("evil.example")])]),
            "requests extensions",
            id="san",
        ),
        pytest.param(
            p256_csr(extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
            "requests extensions",
            id="basic-constraints-ca",
        ),
    ],
)
def test_unacceptable_device_csr_is_rejected_with_the_reason(
    ca: CA, pem: bytes, reason: str
) -> None:
    ca_key, ca_cert = ca
    with pytest.raises(CsrRejectedError, match=reason):
        sign_device_csr(ca_key, ca_cert, pem, DEVICE_ID)


def test_csr_rejection_is_a_value_error() -> None:
    assert issubclass(CsrRejectedError, ValueError)


def test_device_id_must_be_a_valid_topic_level(ca: CA) -> None:
    ca_key, ca_cert = ca
    with pytest.raises(ValueError, match="invalid device id"):
        sign_device_csr(ca_key, ca_cert, p256_csr(), "dev/+/#")


def test_private_key_file_is_owner_only_and_never_overwritten(ca: CA, tmp_path: Path) -> None:
    key, _ = ca
    path = tmp_path / "ca.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert private_key_is_private(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    assert path.read_bytes() == before
    assert load_private_key(path).private_numbers() == key.private_numbers()


def test_group_readable_key_is_reported_as_not_private(ca: CA, tmp_path: Path) -> None:
    path = tmp_path / "loose.key"
    write_private_key(path, ca[0])
    path.chmod(0o640)
    assert not private_key_is_private(path)


def test_certificate_file_is_world_readable_and_round_trips(ca: CA, tmp_path: Path) -> None:
    _, cert = ca
    path = tmp_path / "ca.crt"
    write_certificate(path, cert)
    write_certificate(path, cert)  # certificates are public: replacing one is fine
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert load_certificate(path) == cert
    assert [p.name for p in tmp_path.iterdir()] == ["ca.crt"]


def test_loading_a_key_of_the_wrong_kind_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    write_private_key(path, generate_signing_key())
    with pytest.raises(ValueError, match=r"signing\.key holds a .*Ed25519"):
        load_private_key(path)


def test_signing_key_files_round_trip(tmp_path: Path) -> None:
    key = generate_signing_key()
    write_private_key(tmp_path / "signing.key", key)
    write_public_key(tmp_path / "signing.pub", key.public_key())
    assert private_key_is_private(tmp_path / "signing.key")
    assert stat.S_IMODE((tmp_path / "signing.pub").stat().st_mode) == 0o644
    loaded = load_signing_key(tmp_path / "signing.key")
    public = load_signing_public_key(tmp_path / "signing.pub")
    public.verify(loaded.sign(b"manifest"), b"manifest")
    pem = (tmp_path / "signing.key").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
