"""Enroll this device: make a key here, pin the fleet CA by the join token, trade a CSR for a cert.

First contact is not trust-on-first-use: the CA certificate fetched without verification is only
believed if its sha256 matches the fingerprint in the join token, and the enrollment POST that
carries the registration key is then verified against that pinned CA.
"""

from __future__ import annotations

import logging
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from device_agent.errors import (
    CaFingerprintMismatchError,
    EnrollmentError,
    EnrollmentRefusedError,
    InvalidTokenError,
    ServiceUnreachableError,
    UntrustedServerError,
)
from device_agent.http_answers import caused_by_cert_verification, problem_detail
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    EnrollRequest,
    EnrollResponse,
    InvalidJoinTokenError,
    InvalidTopicError,
    JoinToken,
    ca_fingerprint,
    validate_device_id,
)

__all__ = ["CA_PATH", "ENROLL_PATH", "enroll", "parse_token"]

logger = logging.getLogger(__name__)

CA_PATH = "/api/v1/ca"
ENROLL_PATH = "/api/v1/enroll"


def parse_token(text: str) -> JoinToken:
    """Decode a join token as printed by ``edgefleet keys create``; raise InvalidTokenError."""
    try:
        token = JoinToken.decode(text)
    except InvalidJoinTokenError as exc:
        raise InvalidTokenError(str(exc)) from exc
    if token.url.scheme != "https":
        raise InvalidTokenError(
            f"the join token points at {token.url}, but enrollment sends the registration key "
            "and must use https; have the operator set an https service URL and create a new token"
        )
    return token


def enroll(
    token: JoinToken, state_dir: Path, *, timeout: float, force: bool = False
) -> DeviceIdentity:
    """Enroll with the fleet that issued ``token`` and write the identity into ``state_dir``.

    Nothing is written unless every check passes. Blocking (key generation, HTTPS, fsync): call
    it from a thread when on an event loop.
    """
    state = StateDir(state_dir)
    state.check_can_enroll(force=force)
    base_url = str(token.url).rstrip("/")

    key = ec.generate_private_key(ec.SECP256R1())
    # An empty subject and no extensions: the service chooses the device id (the cert's CN) and
    # refuses CSRs that try to pick their own identity.
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )

    ca_cert = _fetch_pinned_ca(base_url, token.ca, timeout)
    ca_pem = ca_cert.public_bytes(Encoding.PEM)
    request = EnrollRequest(
        registration_key=token.key,
        csr_pem=csr.public_bytes(Encoding.PEM).decode(),
        hostname=socket.gethostname()[:253],
    )
    response = _post_enrollment(base_url, request, ca_pem, timeout)
    cert = _check_issued(base_url, response, key, ca_cert, token.ca)

    identity = DeviceIdentity(
        device_id=response.device_id,
        service_url=base_url,
        mqtt_host=response.mqtt_host,
        mqtt_port=response.mqtt_port,
        topic_prefix=response.topic_prefix,
        tags=dict(response.tags),
        enrolled_at=datetime.now(UTC),
    )
    state.write_enrollment(
        identity,
        key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        cert_pem=cert.public_bytes(Encoding.PEM),
        ca_pem=ca_pem,
        device_token=response.device_token,
    )
    logger.info(
        "enrolled device_id=%s service=%s broker=%s:%d",
        identity.device_id,
        base_url,
        identity.mqtt_host,
        identity.mqtt_port,
    )
    return identity


def _fetch_pinned_ca(base_url: str, expected: str, timeout: float) -> x509.Certificate:
    """GET the fleet CA without verification, then believe it only if the fingerprint matches."""
    url = base_url + CA_PATH
    # No verification on purpose: we cannot know the CA before fetching it. What makes this safe
    # is the fingerprint comparison below, done before anything secret is sent.
    with httpx.Client(verify=False, timeout=timeout) as client:  # noqa: S501
        response = _send(client, "GET", url)
    try:
        ca_cert = x509.load_pem_x509_certificate(response.content)
    except ValueError as exc:
        raise EnrollmentError(
            f"{url} did not return a PEM certificate; check that {base_url} is the edgefleet "
            "service URL (the join token's URL)"
        ) from exc
    got = ca_fingerprint(ca_cert.public_bytes(Encoding.DER))
    if got != expected:
        raise CaFingerprintMismatchError(base_url, expected, got)
    logger.info("pinned fleet CA from %s fingerprint=%s", url, got)
    return ca_cert


def _post_enrollment(
    base_url: str, request: EnrollRequest, ca_pem: bytes, timeout: float
) -> EnrollResponse:
    url = base_url + ENROLL_PATH
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=context, timeout=timeout) as client:
        response = _send(client, "POST", url, json=request.model_dump(mode="json"))
    try:
        return EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise EnrollmentError(
            f"{url} answered with a body that is not an enrollment response "
            f"({exc.errors()[0]['msg']}); check that agent and service versions match"
        ) from exc


def _send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request; httpx errors and non-2xx answers become the agent's enrollment errors."""
    try:
        response = client.request(method, url, **kwargs)
    except httpx.RequestError as exc:
        if caused_by_cert_verification(exc):
            raise UntrustedServerError(
                f"the TLS certificate of {url} is not signed by the pinned fleet CA ({exc}); "
                "the service's HTTPS certificate must be issued by the fleet CA with this host "
                "name or IP in its subjectAltName, or something is intercepting the connection"
            ) from exc
        raise ServiceUnreachableError(
            f"cannot reach the fleet service at {url} ({type(exc).__name__}: {exc}); "
            "check the device's network and that the URL in the join token is reachable from here"
        ) from exc
    if not response.is_success:
        raise EnrollmentRefusedError(url, response.status_code, problem_detail(response))
    return response


def _check_issued(
    base_url: str,
    response: EnrollResponse,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    pinned: str,
) -> x509.Certificate:
    """Refuse a response that would leave the device with an identity it cannot use."""
    where = f"the fleet service at {base_url}"
    fix = "this is a service bug or a mix-up of fleets; report it to the operator"
    try:
        validate_device_id(response.device_id)
        cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
        issued_ca = x509.load_pem_x509_certificate(response.ca_certificate_pem.encode())
    except (InvalidTopicError, ValueError) as exc:
        raise EnrollmentError(f"{where} returned an unusable identity ({exc}); {fix}") from exc
    if ca_fingerprint(issued_ca.public_bytes(Encoding.DER)) != pinned:
        raise EnrollmentError(f"{where} returned a CA other than the pinned one; {fix}")
    ours = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise EnrollmentError(f"{where} returned a certificate for another key; {fix}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollmentError(
            f"{where} returned a certificate not issued by the pinned fleet CA ({exc}); {fix}"
        ) from exc
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [attr.value for attr in common_names] != [response.device_id]:
        # The broker takes the CN as the MQTT username; any other CN would lock us out.
        raise EnrollmentError(
            f"{where} returned a certificate whose CN is not device id {response.device_id!r}; "
            f"{fix}"
        )
    return cert
