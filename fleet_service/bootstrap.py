"""``edgefleet init``: create a fleet home (PKI, signing key, JWT secret, database, first admin)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet_service.audit import record
from fleet_service.auth import create_user, generate_password
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine, migrate, session_scope
from fleet_service.errors import ConflictError
from fleet_service.home import SERVICE_IDENTITY, FleetHome
from fleet_service.pki import (
    certificate_fingerprint,
    create_ca,
    generate_signing_key,
    issue_client_cert,
    issue_server_cert,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
    write_public_key,
)
from fleet_service.roles import Principal, Role

__all__ = [
    "AlreadyInitialisedError",
    "InitResult",
    "add_replica",
    "initialise_home",
    "server_names",
]


class AlreadyInitialisedError(ConflictError):
    """The home already holds a fleet; init never overwrites keys."""


@dataclass(frozen=True)
class InitResult:
    """What ``edgefleet init`` tells the owner once."""

    home: Path
    admin_username: str
    admin_password: str
    ca_fingerprint: str


def server_names(settings: ServiceSettings, extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses for the server certificate (broker and HTTPS API)."""
    names = ["localhost", socket.gethostname(), settings.advertise_host, *extra]
    dns: list[str] = []
    ips: list[str] = ["127.0.0.1", "::1"]
    for name in names:
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            if name and name not in dns:
                dns.append(name)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def initialise_home(
    settings: ServiceSettings, *, extra_names: Sequence[str] = (), admin_username: str = "admin"
) -> InitResult:
    """Create everything a fleet needs in ``settings.home``; refuse if a fleet is there."""
    home = FleetHome(settings.home)
    if home.is_initialised():
        raise AlreadyInitialisedError(
            f"{home.root} already holds a fleet; nothing was changed. To start over, stop "
            f"`edgefleet up` and remove the directory (rm -rf {home.root}), then run init again"
        )
    home.root.mkdir(parents=True, exist_ok=True)
    home.root.chmod(0o700)

    ca_key, ca_cert = create_ca()
    dns, ips = server_names(settings, extra_names)
    server_key, server_cert = issue_server_cert(ca_key, ca_cert, hostnames=dns, ip_addresses=ips)
    service_key, service_cert = issue_client_cert(ca_key, ca_cert, SERVICE_IDENTITY)
    write_private_key(home.server_key, server_key)
    write_certificate(home.server_cert, server_cert)
    write_private_key(home.service_key, service_key)
    write_certificate(home.service_cert, service_cert)
    signing_key = generate_signing_key()
    write_private_key(home.signing_key, signing_key)
    write_public_key(home.signing_pub, signing_key.public_key())
    _write_secret(home.jwt_secret, secrets.token_bytes(32))
    # Every later command reads these, so join tokens carry the address devices can reach.
    home.save_settings(advertise_host=settings.advertise_host)

    url = settings.resolved_database_url
    migrate(url)
    password = generate_password()
    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            create_user(session, admin_username, password, role="admin")
            record(session, _INIT, "user.create", admin_username, detail=_FIRST_ADMIN)
    finally:
        engine.dispose()

    # The CA goes last: its presence is what marks the home as initialised.
    write_private_key(home.ca_key, ca_key)
    write_certificate(home.ca_cert, ca_cert)
    return InitResult(
        home=home.root,
        admin_username=admin_username,
        admin_password=password,
        ca_fingerprint=certificate_fingerprint(ca_cert),
    )


_FIRST_ADMIN = {"role": "admin", "password": "generated"}
# Named without asking the OS for a login name: init also runs in containers whose user has none.
_INIT = Principal(name="cli:edgefleet-init", kind="cli", role=Role.ADMIN, address="local")


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def add_replica(settings: ServiceSettings, name: str) -> str:
    """Issue the MQTT identity of service replica ``name`` and record it; returns the CN."""
    home = FleetHome(settings.home)
    home.require_initialised()
    replica = ServiceSettings(home=settings.home, replica=name)
    identity = replica.service_identity
    cert_path, key_path = home.service_files(identity)
    if name in settings.replicas or key_path.exists():
        raise ConflictError(f"replica {name!r} already exists ({cert_path})")
    ca_key, ca_cert = load_private_key(home.ca_key), load_certificate(home.ca_cert)
    key, cert = issue_client_cert(ca_key, ca_cert, identity)
    write_private_key(key_path, key)
    write_certificate(cert_path, cert)
    home.save_settings(replicas=[*settings.replicas, name])
    return identity
