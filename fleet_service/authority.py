"""The fleet CA as loaded by a running service: its key, certificate and fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from fleet_protocol import ca_fingerprint
from fleet_service.home import FleetHome
from fleet_service.pki import load_certificate, load_private_key

__all__ = ["CertificateAuthority"]


@dataclass(frozen=True)
class CertificateAuthority:
    """The fleet CA, loaded once at start-up."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, home: FleetHome) -> CertificateAuthority:
        """Read the CA written by ``edgefleet init``."""
        home.require_initialised()
        return cls(key=load_private_key(home.ca_key), cert=load_certificate(home.ca_cert))

    @property
    def pem(self) -> str:
        """The CA certificate in PEM, as handed to devices."""
        return self.cert.public_bytes(Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the CA's DER, as pinned by join tokens."""
        return ca_fingerprint(self.cert.public_bytes(Encoding.DER))
