"""Third-party integrations: a client certificate bundle that may read granted device topics.

An integration is an MQTT identity (certificate CN ``integration-<name>``) issued by the fleet
CA, with a key the service generates and shows once. The broker's ACL lets it read the granted
topic kinds (``results``, ``telemetry``, ``status``) of every device or, with a tag, of the
devices carrying that tag now and later; nothing else, and it may publish nowhere. The primary's
broker policy loop renders those grants into the ACL (:mod:`fleet_service.broker_policy`).
Revoking puts its certificate on the CRL, removes its grants and drops its session.

Errors::

    ServiceError
     ├── NotFoundError      404  no such integration
     ├── ConflictError      409  the name is taken, or the integration is already revoked
     └── ForbiddenError     403  a tag-scoped API token manages no integrations
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives import serialization
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_protocol import TopicKind
from fleet_service import audit
from fleet_service.authority import CertificateAuthority
from fleet_service.errors import ConflictError, ForbiddenError, NotFoundError
from fleet_service.pki import issue_client_cert
from fleet_service.revocation import record_issued, revoke_certificates
from fleet_service.roles import Principal, parse_tag
from fleet_service.tables import Integration

__all__ = [
    "IDENTITY_PREFIX",
    "READ_KINDS",
    "IntegrationBundle",
    "IntegrationCreate",
    "IntegrationCreated",
    "IntegrationPublic",
    "ReadKind",
    "acl_topics",
    "create_integration",
    "integration_public",
    "list_integrations",
    "revoke_integration",
    "subscription_topics",
    "write_bundle",
]

# Every integration's certificate CN starts with this: never a device id (``dev-``) nor a
# service identity (``edgefleet-service``), so no grant can land on someone else.
IDENTITY_PREFIX = "integration-"

ReadKind = Literal["results", "telemetry", "status"]
# What each grant reads below a device (the topic levels after ``devices/{id}/``): only what
# devices send. Never commands, receipts or the desired state (which carries the keys of
# encrypted model releases).
READ_KINDS: dict[str, str] = {
    "results": f"{TopicKind.RESULTS.value}/+",
    "telemetry": TopicKind.TELEMETRY.value,
    "status": TopicKind.STATUS.value,
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"integration name {name!r}: use 1-48 of a-z, 0-9 and '-', starting with a letter or "
            "digit (it becomes part of the certificate's name)"
        )
    return name


def _check_tag(tag: str | None) -> str | None:
    if tag is not None:
        parse_tag(tag)
    return tag


def _check_read(read: list[ReadKind]) -> list[ReadKind]:
    if len(set(read)) != len(read):
        raise ValueError(f"read {read}: name each topic kind once")
    return sorted(read)


class IntegrationCreate(BaseModel):
    """``POST /api/v1/integrations`` body."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(_check_name)]
    read: Annotated[list[ReadKind], Field(min_length=1), AfterValidator(_check_read)]
    # "key=value": only devices carrying this tag (now or later); None: every device.
    tag: Annotated[str | None, Field(max_length=200), AfterValidator(_check_tag)] = None


class IntegrationPublic(BaseModel):
    """An integration as listed; its key is never shown again."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    identity: str
    read: list[str]
    tag: str | None
    cert_not_after: datetime
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class IntegrationBundle(BaseModel):
    """What the third party needs to connect; ``key_pem`` is shown this once."""

    model_config = ConfigDict(frozen=True)

    cert_pem: str
    key_pem: str
    ca_pem: str
    broker_host: str
    broker_port: int
    topics: list[str]
    mosquitto_sub: str


class IntegrationCreated(BaseModel):
    """Answer to creating an integration."""

    model_config = ConfigDict(frozen=True)

    integration: IntegrationPublic
    bundle: IntegrationBundle


def integration_public(row: Integration) -> IntegrationPublic:
    """The API shape of an integration row."""
    return IntegrationPublic(
        id=row.id,
        name=row.name,
        identity=row.identity,
        read=list(row.grants),
        tag=row.tag,
        cert_not_after=row.cert_not_after,
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def subscription_topics(read: Iterable[str], prefix: str) -> list[str]:
    """The topic filters an integration subscribes to (the ACL narrows them to its devices)."""
    return acl_topics(read, None, prefix)


def acl_topics(read: Iterable[str], device_ids: Sequence[str] | None, prefix: str) -> list[str]:
    """The ACL ``topic read`` lines of a grant: per device, or for ``+`` when untagged."""
    leaves = [READ_KINDS[kind] for kind in sorted(read)]
    devices = ["+"] if device_ids is None else sorted(device_ids)
    return [f"{prefix}/devices/{device}/{leaf}" for device in devices for leaf in leaves]


def _refuse_scoped(who: Principal) -> None:
    if who.tag is not None:
        raise ForbiddenError(
            "a tag-scoped API token cannot manage integrations; use an unscoped admin token"
        )


def _mosquitto_sub(host: str, port: int, topics: list[str]) -> str:
    parts = [
        "mosquitto_sub",
        *("-h", host, "-p", str(port)),
        *("--cafile", "ca.crt", "--cert", "client.crt", "--key", "client.key"),
        *("-V", "mqttv5", "-q", "1", "-v"),
    ]
    for topic in topics:
        parts += ["-t", topic]
    return shlex.join(parts)


def create_integration(
    session: Session,
    body: IntegrationCreate,
    who: Principal,
    authority: CertificateAuthority,
    *,
    broker_host: str,
    broker_port: int,
    topic_prefix: str,
    cert_days: int,
) -> IntegrationCreated:
    """Issue the integration's certificate and key, record both rows and an audit event.

    The key is generated here and returned once; only the certificate's serial is kept.
    """
    _refuse_scoped(who)
    if session.exec(select(Integration).where(Integration.name == body.name)).first():
        raise ConflictError(
            f"an integration named {body.name!r} exists (names are never reused, even after "
            "revocation, so the audit log stays unambiguous); choose another name"
        )
    identity = IDENTITY_PREFIX + body.name
    key, cert = issue_client_cert(authority.key, authority.cert, identity, cert_days)
    now = datetime.now(UTC)
    row = Integration(
        id="int-" + secrets.token_hex(6),
        name=body.name,
        identity=identity,
        grants=list(body.read),
        tag=body.tag,
        cert_serial=format(cert.serial_number, "x"),
        cert_not_after=cert.not_valid_after_utc,
        created_by=who.name,
        created_at=now,
    )
    session.add(row)
    record_issued(session, cert, kind="integration")
    audit.record(
        session,
        who,
        "integration.create",
        row.id,
        detail={"name": body.name, "read": list(body.read), "tag": body.tag},
    )
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create of the same name
        raise ConflictError(f"an integration named {body.name!r} exists") from exc
    topics = subscription_topics(body.read, topic_prefix)
    bundle = IntegrationBundle(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        ca_pem=authority.pem,
        broker_host=broker_host,
        broker_port=broker_port,
        topics=topics,
        mosquitto_sub=_mosquitto_sub(broker_host, broker_port, topics),
    )
    return IntegrationCreated(integration=integration_public(row), bundle=bundle)


def list_integrations(session: Session) -> list[IntegrationPublic]:
    """Every integration, newest first, revoked ones included."""
    rows = session.exec(
        select(Integration)
        .where(col(Integration.identity).startswith(IDENTITY_PREFIX))
        .order_by(col(Integration.created_at).desc())
    )
    return [integration_public(row) for row in rows]


def _get(session: Session, integration_id: str) -> Integration:
    row = session.get(Integration, integration_id)
    if row is None:
        row = session.exec(select(Integration).where(Integration.name == integration_id)).first()
    # Site bridges share the table (fleet_service/sites.py) and are managed as sites.
    if row is None or not row.identity.startswith(IDENTITY_PREFIX):
        raise NotFoundError(f"integration {integration_id!r} does not exist")
    return row


def revoke_integration(
    session: Session, integration_id: str, who: Principal, *, reason: str | None = None
) -> IntegrationPublic:
    """Revoke an integration (by id or name): its certificate goes on the CRL, its grants
    leave the ACL and the policy loop drops its session. Revoking twice is a ConflictError."""
    _refuse_scoped(who)
    row = _get(session, integration_id)
    if row.revoked_at is not None:
        raise ConflictError(
            f"integration {row.name} was already revoked at {row.revoked_at.isoformat()}"
        )
    now = datetime.now(UTC)
    serials = revoke_certificates(session, row.identity, reason=reason or "revoked", now=now)
    row.revoked_at = now
    session.add(row)
    audit.record(
        session,
        who,
        "integration.revoke",
        row.id,
        detail={"name": row.name, "reason": reason, "serials": serials},
    )
    return integration_public(row)


_README = """# edgefleet integration `{name}`

This bundle lets `{name}` read device data from the edgefleet broker over MQTT with mutual TLS.
It may read: {read} ({scope}). It cannot publish anything, and it cannot read anything else.

Files:
- `client.crt`, `client.key`: this integration's identity ({identity}). Keep the key secret
  (it is 0600 here and is not stored by edgefleet: if it is lost, create a new integration).
- `ca.crt`: the fleet CA, to verify the broker.
- `bundle.json`: broker address, topics and certificate expiry, for programs.

Broker: `mqtts://{host}:{port}` (MQTT 3.1.1 or 5, TLS 1.2+). The certificate's name is the
client id: one connection at a time; a second one takes over the first.

Topics to subscribe to:
{topics}

Try it:

    {mosquitto_sub}

The certificate expires on {not_after}. An administrator can revoke it at any time
(`edgefleet integrations revoke {name}`); the connection is then closed and refused.
"""


def write_bundle(directory: Path, created: IntegrationCreated) -> list[Path]:
    """Write the bundle into ``directory`` (created 0700 if missing); the key file is 0600.

    Refuses to overwrite an existing bundle (FileExistsError).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    integration, bundle = created.integration, created.bundle
    readme = _README.format(
        name=integration.name,
        identity=integration.identity,
        read=", ".join(integration.read),
        scope=f"devices tagged {integration.tag}" if integration.tag else "every device",
        host=bundle.broker_host,
        port=bundle.broker_port,
        topics="\n".join(f"- `{t}`" for t in bundle.topics),
        mosquitto_sub=bundle.mosquitto_sub,
        not_after=integration.cert_not_after.isoformat(),
    )
    meta = {
        "name": integration.name,
        "identity": integration.identity,
        "broker_host": bundle.broker_host,
        "broker_port": bundle.broker_port,
        "topics": bundle.topics,
        "read": integration.read,
        "tag": integration.tag,
        "cert_not_after": integration.cert_not_after.isoformat(),
    }
    files = [
        ("client.key", bundle.key_pem, 0o600),
        ("client.crt", bundle.cert_pem, 0o644),
        ("ca.crt", bundle.ca_pem, 0o644),
        ("bundle.json", json.dumps(meta, indent=2) + "\n", 0o644),
        ("README.md", readme, 0o644),
    ]
    written = []
    for name, text, mode in files:
        path = directory / name
        # O_EXCL with the final mode: the key is never readable by others, not even briefly.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        path.chmod(mode)  # the umask may have narrowed the public files
        written.append(path)
    return written
