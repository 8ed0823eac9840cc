"""Checks on device, integration and control-plane identities: certificates that expire,
revoked identities still connecting, one identity held by two machines, devices gone silent."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from sqlalchemy import and_, or_
from sqlmodel import Session, col, select

from fleet_service.config import SERVICE_IDENTITY
from fleet_service.pki import load_certificate
from fleet_service.security_audit.context import Audit, span, when
from fleet_service.security_audit.findings import SecurityFinding, Severity
from fleet_service.security_audit.holders import integration_holder
from fleet_service.tables import Device, Integration

__all__ = [
    "REVOCATION_GRACE",
    "check_device_certs",
    "check_duplicate_connections",
    "check_home_certs",
    "check_integration_certs",
    "check_revoked_devices_seen",
    "check_revoked_integrations_seen",
    "check_silent_devices",
]

# Messages a device queued before its revocation may still be stored, and a broker log line
# carries whole seconds of local time: activity this soon after a revocation is not news.
REVOCATION_GRACE = timedelta(seconds=60)

_REVOKED_FIX = (
    "the broker is not refusing its certificate: check that the broker's mosquitto.conf has a "
    "crlfile line and restart `edgefleet up` so it reloads the CRL, then revoke again ({revoke})"
)


# --- certificates ---


def check_device_certs(audit: Audit) -> Iterator[SecurityFinding]:
    """Devices whose current certificate has expired or expires within the warning period."""
    horizon = audit.now + min(audit.policy.cert_warn, audit.policy.device_cert_ttl / 4)
    devices = audit.session.exec(
        select(Device).where(col(Device.revoked_at).is_(None), Device.cert_not_after < horizon)
    )
    for device in devices:
        yield _cert_finding(
            f"device:{device.id}",
            device.cert_not_after,
            audit.now,
            expired_fix=(
                "the device can no longer connect: enroll it again with a new registration key "
                "(`edgefleet keys create`), or decommission it "
                f"(DELETE /api/v1/devices/{device.id})"
            ),
            expiring_fix=(
                "the agent renews its certificate over MQTT before expiry: make sure the device "
                "is online and runs an agent that renews; otherwise enroll it again before then"
            ),
        )


def check_integration_certs(audit: Audit) -> Iterator[SecurityFinding]:
    """Integrations whose client certificate has expired or expires soon."""
    horizon = audit.now + audit.policy.cert_warn
    integrations = audit.session.exec(
        select(Integration).where(
            col(Integration.revoked_at).is_(None), Integration.cert_not_after < horizon
        )
    )
    for integration in integrations:
        holder = integration_holder(integration)
        yield _cert_finding(
            holder.target,
            integration.cert_not_after,
            audit.now,
            expired_fix=(
                f"issue a new bundle: revoke it ({holder.revoke}), create it again with "
                f"{holder.reissue}"
            ),
        )


def check_home_certs(audit: Audit) -> Iterator[SecurityFinding]:
    """The control plane's own certificates (CA, broker server, service client)."""
    for name, path in audit.policy.home_certs:
        try:
            not_after = load_certificate(path).not_valid_after_utc
        except (OSError, ValueError):
            continue  # a replica host or a compose service may not hold them
        if not_after >= audit.now + audit.policy.cert_warn:
            continue
        fix = (
            "every certificate it signed stops working with it: create a new fleet CA and "
            "enroll the devices again before then"
            if name == "ca"
            else f"issue a new one from the fleet CA into {path} and restart `edgefleet up`"
        )
        yield _cert_finding(f"cert:{name}", not_after, audit.now, expired_fix=fix)


def _cert_finding(
    target: str,
    not_after: datetime,
    now: datetime,
    *,
    expired_fix: str,
    expiring_fix: str | None = None,
) -> SecurityFinding:
    """An expired (high) or expiring (medium) certificate; ``expiring_fix`` defaults to the
    expired one's."""
    if not_after <= now:
        return SecurityFinding(
            kind="cert-expired",
            severity=Severity.HIGH,
            target=target,
            detail=f"certificate expired {span(now - not_after)} ago ({when(not_after)})",
            fix=expired_fix,
        )
    return SecurityFinding(
        kind="cert-expiring",
        severity=Severity.MEDIUM,
        target=target,
        detail=f"certificate expires in {span(not_after - now)} ({when(not_after)})",
        fix=expiring_fix if expiring_fix is not None else expired_fix,
    )


# --- revoked identities still in use ---


def check_revoked_devices_seen(audit: Audit) -> Iterator[SecurityFinding]:
    """Revoked devices that sent messages, came online, or connected after their revocation."""
    devices = audit.session.exec(select(Device).where(col(Device.revoked_at).is_not(None)))
    for device in devices:
        revoked_at = device.revoked_at
        if revoked_at is None:  # excluded by the query; narrows the type
            continue
        cutoff = revoked_at + REVOCATION_GRACE
        evidence = []
        if device.last_seen is not None and device.last_seen > cutoff:
            evidence.append(f"its last message arrived {when(device.last_seen)}")
        changed = device.status_changed_at
        if device.status == "online" and changed is not None and changed > cutoff:
            evidence.append(f"it reported online {when(changed)}")
        evidence.extend(_connected_after(audit, device.id, cutoff))
        if evidence:
            yield _revoked_finding(
                f"device:{device.id}",
                revoked_at,
                evidence,
                revoke=f"POST /api/v1/devices/{device.id}/revoke",
            )


def check_revoked_integrations_seen(audit: Audit) -> Iterator[SecurityFinding]:
    """Revoked integrations whose identity the broker still accepted after the revocation."""
    if audit.broker is None:
        return
    integrations = audit.session.exec(
        select(Integration).where(col(Integration.revoked_at).is_not(None))
    )
    for integration in integrations:
        revoked_at = integration.revoked_at
        if revoked_at is None:  # excluded by the query; narrows the type
            continue
        evidence = _connected_after(audit, integration.identity, revoked_at + REVOCATION_GRACE)
        if evidence:
            holder = integration_holder(integration)
            yield _revoked_finding(holder.target, revoked_at, evidence, revoke=holder.revoke)


def _revoked_finding(
    target: str, revoked_at: datetime, evidence: list[str], *, revoke: str
) -> SecurityFinding:
    """A revoked identity still in use; ``revoke`` is the request that revokes it again."""
    return SecurityFinding(
        kind="revoked-connected",
        severity=Severity.HIGH,
        target=target,
        detail=f"revoked {when(revoked_at)}, but {'; '.join(evidence)}",
        fix=_REVOKED_FIX.format(revoke=revoke),
    )


def _connected_after(audit: Audit, identity: str, cutoff: datetime) -> list[str]:
    if audit.broker is None:
        return []
    last = audit.broker.last_connected(identity)
    if last is None or last <= cutoff:
        return []
    hosts = ", ".join(audit.broker.addresses(identity, cutoff))
    return [f"the broker accepted a connection as {identity} at {when(last)} from {hosts}"]


# --- one identity, two machines ---


def check_duplicate_connections(audit: Audit) -> Iterator[SecurityFinding]:
    """Identities whose connections keep taking over each other: two places hold one key."""
    if audit.broker is None:
        return
    since = audit.now - audit.policy.takeover_window
    window = span(audit.policy.takeover_window)
    for identity, times in sorted(audit.broker.takeovers.items()):
        count = sum(1 for at in times if at >= since)
        if count < audit.policy.takeover_threshold:
            continue
        hosts = ", ".join(audit.broker.addresses(identity, since)) or "unknown addresses"
        target, fix = _identity_target(audit.session, identity)
        yield SecurityFinding(
            kind="duplicate-connection",
            severity=Severity.HIGH,
            target=target,
            detail=(
                f"{count} connections as {identity} took over an existing connection of the "
                f"same identity in the last {window} (connected from {hosts}): two machines "
                "hold its certificate and key"
            ),
            fix=fix,
        )


def _identity_target(session: Session, identity: str) -> tuple[str, str]:
    if identity == SERVICE_IDENTITY or identity.startswith(f"{SERVICE_IDENTITY}-"):
        return f"service:{identity}", (
            "two service processes run with one MQTT identity: give each replica its own "
            "with `edgefleet replicas add NAME` and run it with `edgefleet up --replica NAME`"
        )
    if session.get(Device, identity) is not None:
        return f"device:{identity}", (
            "find the second machine (addresses above), then revoke the device "
            f"(POST /api/v1/devices/{identity}/revoke) and enroll the genuine one again with a "
            "new registration key"
        )
    integration = session.exec(select(Integration).where(Integration.identity == identity)).first()
    if integration is not None:
        holder = integration_holder(integration)
        return holder.target, (
            f"revoke it ({holder.revoke}) and create a new bundle for the one system that "
            f"should hold it: {holder.reissue}"
        )
    return f"identity:{identity}", (
        "a certificate of the fleet CA that no device or integration owns is in use twice: "
        "find who holds it and add its serial to the CRL"
    )


# --- devices gone quiet ---


def check_silent_devices(audit: Audit) -> Iterator[SecurityFinding]:
    """Devices not heard from for long (or never), which still hold a valid identity."""
    cutoff = audit.now - audit.policy.silent_after
    devices = audit.session.exec(
        select(Device).where(
            col(Device.revoked_at).is_(None),
            or_(
                col(Device.last_seen) < cutoff,
                and_(col(Device.last_seen).is_(None), col(Device.enrolled_at) < cutoff),
            ),
        )
    )
    for device in devices:
        heard = (
            f"last heard from {span(audit.now - device.last_seen)} ago ({when(device.last_seen)})"
            if device.last_seen is not None
            else f"enrolled {when(device.enrolled_at)} and never heard from"
        )
        yield SecurityFinding(
            kind="silent-device",
            severity=Severity.MEDIUM,
            target=f"device:{device.id}",
            detail=f"{heard}; its certificate and token stay valid",
            fix=(
                "find out why it stopped reporting; if it is gone, decommission it "
                f"(DELETE /api/v1/devices/{device.id}) so its identity is revoked"
            ),
        )
