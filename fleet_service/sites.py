"""Site bridges: a site broker's bundle from the fleet CA, and the central grants of its uplink.

A site runs its own Mosquitto for its devices and holds one bridge connection to the central
broker, with a client certificate whose CN is ``site-<name>``. The central broker's ACL lets
that identity write what the site's devices (those carrying the site's tag, now or later) may
write and read what they may read; nothing else. The primary's broker policy loop renders those
grants (:func:`bridge_acl_topics`, used by :mod:`fleet_service.broker_policy`).

A site is stored as an :class:`~fleet_service.tables.Integration` row whose identity starts
with ``site-`` and whose grants are ``["bridge"]``: it has exactly an integration's lifecycle
(a certificate on record, a tag, revocation), so it needs no table of its own. Integration
listings leave these rows out.

Errors::

    ServiceError
     ├── NotFoundError      404  no such site
     └── ConflictError      409  the name is taken, or the site is already revoked
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path, PurePosixPath
from typing import Annotated

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker import (
    DEVICE_DOWNLINK_LEAVES,
    DEVICE_UPLINK_LEAVES,
    SITE_FILES,
    SiteBrokerConfig,
    render_site_files,
)
from fleet_service import audit
from fleet_service.authority import CertificateAuthority
from fleet_service.errors import ConflictError, NotFoundError
from fleet_service.pki import Revocation, build_crl, issue_client_cert, issue_server_cert
from fleet_service.revocation import record_issued, revoke_certificates
from fleet_service.roles import Principal, parse_tag
from fleet_service.tables import Integration, IssuedCertificate

__all__ = [
    "BRIDGE_GRANT",
    "SITE_IDENTITY_PREFIX",
    "SiteBundle",
    "SiteCreate",
    "SitePublic",
    "bridge_acl_topics",
    "create_site",
    "fresh_crl_pem",
    "is_site",
    "list_sites",
    "revoke_site",
    "site_name",
    "site_public",
    "write_site_bundle",
]

# Every site bridge's certificate CN starts with this: never a device id (``dev-``), an
# integration (``integration-``) nor a service identity, so its grants land on no one else.
SITE_IDENTITY_PREFIX = "site-"
# The one grant of a site's Integration row; integrations grant topic kinds (results, ...).
BRIDGE_GRANT = "bridge"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"site name {name!r}: use 1-48 of a-z, 0-9 and '-', starting with a letter or digit "
            "(it becomes part of the bridge certificate's name)"
        )
    return name


def _check_tag(tag: str) -> str:
    parse_tag(tag)
    if any(c.isspace() for c in tag):
        raise ValueError(f"tag {tag!r} must not contain whitespace")
    return tag


def _check_sans(sans: list[str]) -> list[str]:
    for san in sans:
        if not san or any(c.isspace() or c in "/#,'\"" for c in san):
            raise ValueError(
                f"--san {san!r} is not a host name or IP address; give the name or address the "
                "site's devices use to reach the site broker"
            )
    return sans


class SiteCreate(BaseModel):
    """What ``edgefleet sites create`` asks for."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(_check_name)]
    # "key=value": the devices this site carries (now or later); by default site=<name>.
    tag: Annotated[str, Field(max_length=200), AfterValidator(_check_tag)]
    # Names and addresses of the site broker, as its devices reach it (its server certificate).
    sans: Annotated[list[str], Field(min_length=1), AfterValidator(_check_sans)]
    # Where the bundle will live on the site host; every path in mosquitto.conf is below it.
    install_dir: str
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    bind_host: str = "0.0.0.0"  # noqa: S104 - the site's devices connect over the LAN; mTLS only
    run_as_user: str = "mosquitto"


class SitePublic(BaseModel):
    """A site as listed; its keys are never shown again."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    identity: str
    tag: str | None
    cert_not_after: datetime
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class SiteBundle:
    """The files of a site broker, by bundle file name; the keys are in here only."""

    site: SitePublic
    files: dict[str, str]
    central: str


def is_site(row: Integration) -> bool:
    """Whether an Integration row is a site bridge."""
    return row.identity.startswith(SITE_IDENTITY_PREFIX)


def site_name(row: Integration) -> str:
    """The name a site was created with (its row's identity is ``site-<name>``)."""
    return row.identity.removeprefix(SITE_IDENTITY_PREFIX)


def site_public(row: Integration) -> SitePublic:
    """The public shape of a site's row."""
    return SitePublic(
        id=row.id,
        name=site_name(row),
        identity=row.identity,
        tag=row.tag,
        cert_not_after=row.cert_not_after,
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def bridge_acl_topics(
    device_ids: Sequence[str] | None, prefix: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The central ACL's ``(read, write)`` topics of a site bridge carrying ``device_ids``.

    Per device, never a wildcard: a device that loses the tag or is revoked leaves the grant.
    None (a site without a tag) grants nothing.
    """
    devices = sorted(device_ids or ())
    read = tuple(f"{prefix}/devices/{d}/{leaf}" for d in devices for leaf in DEVICE_DOWNLINK_LEAVES)
    write = tuple(f"{prefix}/devices/{d}/{leaf}" for d in devices for leaf in DEVICE_UPLINK_LEAVES)
    return read, write


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def create_site(
    session: Session,
    body: SiteCreate,
    who: Principal,
    authority: CertificateAuthority,
    *,
    crl_pem: str,
    central_host: str,
    central_port: int,
    topic_prefix: str,
    cert_days: int,
) -> SiteBundle:
    """Issue the site's bridge and server certificates, record the site and an audit event, and
    render its broker files. The keys are generated here and returned once, never stored."""
    identity = SITE_IDENTITY_PREFIX + body.name
    # Checked (ValueError) before anything is issued or recorded.
    config = SiteBrokerConfig(
        site_name=body.name,
        bridge_identity=identity,
        central_host=central_host,
        central_port=central_port,
        install_dir=PurePosixPath(body.install_dir),
        port=body.port,
        bind_host=body.bind_host,
        topic_prefix=topic_prefix,
        run_as_user=body.run_as_user,
        tag=body.tag,
    )
    if session.exec(select(Integration).where(Integration.identity == identity)).first():
        raise ConflictError(
            f"a site named {body.name!r} exists (names are never reused, even after revocation, "
            "so the audit log stays unambiguous); choose another name"
        )
    if session.exec(select(Integration).where(Integration.name == identity)).first():
        raise ConflictError(f"an integration is named {identity!r}; choose another site name")
    ips = []
    names = []
    for san in body.sans:
        try:
            ips.append(str(ip_address(san)))
        except ValueError:
            names.append(san)
    server_key, server_cert = issue_server_cert(
        authority.key, authority.cert, hostnames=names, ip_addresses=ips
    )
    bridge_key, bridge_cert = issue_client_cert(authority.key, authority.cert, identity, cert_days)
    row = Integration(
        id="site-" + secrets.token_hex(6),
        name=identity,
        identity=identity,
        grants=[BRIDGE_GRANT],
        tag=body.tag,
        cert_serial=format(bridge_cert.serial_number, "x"),
        cert_not_after=bridge_cert.not_valid_after_utc,
        created_by=who.name,
        created_at=datetime.now(UTC),
    )
    session.add(row)
    record_issued(session, bridge_cert, kind="site-bridge")
    audit.record(
        session,
        who,
        "site.create",
        row.id,
        detail={"name": body.name, "tag": body.tag, "sans": body.sans},
    )
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise ConflictError(f"a site named {body.name!r} exists") from exc
    rendered = render_site_files(config)
    public = site_public(row)
    central = f"{central_host}:{central_port}"
    files = {
        SITE_FILES["conf"]: rendered.conf_text,
        SITE_FILES["acl"]: rendered.acl_text,
        SITE_FILES["ca"]: authority.pem,
        SITE_FILES["crl"]: crl_pem,
        SITE_FILES["server_cert"]: _pem_cert(server_cert),
        SITE_FILES["server_key"]: _pem_key(server_key),
        SITE_FILES["bridge_cert"]: _pem_cert(bridge_cert),
        SITE_FILES["bridge_key"]: _pem_key(bridge_key),
        "site.json": json.dumps(
            {
                "name": body.name,
                "identity": identity,
                "tag": body.tag,
                "central": central,
                "site_broker": {"port": body.port, "names": body.sans},
                "install_dir": body.install_dir,
                "bridge_cert_not_after": public.cert_not_after.isoformat(),
                "server_cert_not_after": server_cert.not_valid_after_utc.isoformat(),
            },
            indent=2,
        )
        + "\n",
        "README.md": _readme(body, public, central, config, crl_pem),
    }
    return SiteBundle(site=public, files=files, central=central)


def fresh_crl_pem(session: Session, authority: CertificateAuthority, lifetime: timedelta) -> str:
    """The fleet CRL signed now from the database, as the primary's policy loop would write it.

    The site gets its own copy; the primary's file may be missing or half its lifetime old.
    """
    now = datetime.now(UTC)
    rows = session.exec(
        select(IssuedCertificate.serial, IssuedCertificate.revoked_at).where(
            col(IssuedCertificate.revoked_at).is_not(None),
            col(IssuedCertificate.not_after) > now,
        )
    ).all()
    revoked = [Revocation(int(serial, 16), at) for serial, at in rows if at is not None]
    crl = build_crl(authority.key, authority.cert, revoked, lifetime=lifetime)
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def list_sites(session: Session) -> list[SitePublic]:
    """Every site, newest first, revoked ones included."""
    rows = session.exec(
        select(Integration)
        .where(col(Integration.identity).startswith(SITE_IDENTITY_PREFIX))
        .order_by(col(Integration.created_at).desc())
    )
    return [site_public(row) for row in rows]


def revoke_site(
    session: Session, name: str, who: Principal, *, reason: str | None = None
) -> tuple[SitePublic, list[str]]:
    """Revoke a site's bridge: its certificate goes on the CRL, its grants leave the central
    ACL and the policy loop drops its connection. Returns the site and the revoked serials."""
    identity = SITE_IDENTITY_PREFIX + name.removeprefix(SITE_IDENTITY_PREFIX)
    row = session.exec(select(Integration).where(Integration.identity == identity)).first()
    if row is None:
        raise NotFoundError(f"site {name!r} does not exist; `edgefleet sites list` shows them")
    if row.revoked_at is not None:
        raise ConflictError(f"site {name} was already revoked at {row.revoked_at.isoformat()}")
    now = datetime.now(UTC)
    serials = revoke_certificates(session, row.identity, reason=reason or "revoked", now=now)
    row.revoked_at = now
    session.add(row)
    audit.record(
        session,
        who,
        "site.revoke",
        row.id,
        detail={"name": name, "reason": reason, "serials": serials},
    )
    return site_public(row), serials


_README = """# edgefleet site `{name}`

A Mosquitto broker for the devices of site `{name}`, bridged to the central edgefleet broker
at `{central}` over one connection. Issued by the fleet CA on the control plane.

## Files (they belong in `{install_dir}` on the site host)

- `mosquitto.conf`, `acl`: the site broker's configuration (paths point into `{install_dir}`).
- `server.crt`, `server.key`: the site broker's TLS identity, valid for {sans}.
- `bridge.crt`, `bridge.key`: the uplink's identity (`{identity}`), as the central broker sees it.
- `ca.crt`: the fleet CA. `crl.pem`: the fleet's certificate revocation list.
- `persistence/`: mosquitto's sessions and queued messages.

Keep the two keys secret: they are 0600 here and edgefleet does not keep them. If they are lost,
create a new site.

## Run it

    sudo mkdir -p {install_dir} && sudo cp -a . {install_dir}/
    sudo chown -R {user} {install_dir}
    mosquitto -c {install_dir}/mosquitto.conf

Devices connect to `mqtts://{first_san}:{port}` with their own certificates, exactly as to the
central broker. Point an enrolled device here by setting `mqtt_host` and `mqtt_port` in its
`device.json` (in the agent's state directory) and restarting the agent. It still reaches the
control plane over HTTPS for enrollment and model downloads.

## What the central broker allows

The bridge may carry only the topics of devices tagged `{tag}` (enrolled with a registration
key carrying that tag), and follows enrollments and revocations. Messages of any other device
are refused at the central broker.

## Keep the CRL fresh

Mosquitto refuses every client once the CRL's `nextUpdate` has passed ({crl_next}). Copy
`<fleet home>/broker/crl.pem` from the control plane to `{install_dir}/crl.pem` regularly (the
control plane signs it again every half lifetime) and send the site mosquitto SIGHUP.

## Revocation

`edgefleet sites revoke {name}` on the control plane cuts this site off: its bridge certificate
(valid until {not_after}) is refused from then on.
"""


def _crl_next_update(crl_pem: str) -> str:
    next_update = x509.load_pem_x509_crl(crl_pem.encode()).next_update_utc
    return next_update.isoformat() if next_update is not None else "unknown"


def _readme(
    body: SiteCreate, site: SitePublic, central: str, config: SiteBrokerConfig, crl_pem: str
) -> str:
    return _README.format(
        name=body.name,
        central=central,
        install_dir=config.install_dir,
        sans=", ".join(body.sans),
        identity=site.identity,
        user=config.run_as_user,
        first_san=body.sans[0],
        port=body.port,
        tag=body.tag,
        crl_next=_crl_next_update(crl_pem),
        not_after=site.cert_not_after.isoformat(),
    )


def write_site_bundle(directory: Path, bundle: SiteBundle) -> list[Path]:
    """Write the bundle into ``directory`` (created 0700 if missing); keys are 0600.

    Refuses to overwrite an existing file (FileExistsError).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name, text in bundle.files.items():
        mode = 0o600 if name.endswith(".key") else 0o644
        path = directory / name
        # O_EXCL with the final mode: a key is never readable by others, not even briefly.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        path.chmod(mode)  # the umask may have narrowed the public files
        written.append(path)
    # Only mosquitto writes here; queued commands are nobody else's business.
    persistence = directory / SITE_FILES["persistence"]
    persistence.mkdir(mode=0o700, exist_ok=True)
    written.append(persistence)
    return written
