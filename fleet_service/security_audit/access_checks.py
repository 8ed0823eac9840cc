"""Checks on who can get in: registration keys, integration grants, user logins, API tokens and
the number of admins."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import and_, or_
from sqlmodel import col, select

from fleet_service.integrations import READ_KINDS
from fleet_service.security_audit.context import Audit, by_role, span, when
from fleet_service.security_audit.findings import SecurityFinding, Severity
from fleet_service.security_audit.holders import integration_holder
from fleet_service.tables import ApiToken, Integration, RegistrationKey, User

__all__ = [
    "check_admin_count",
    "check_api_tokens",
    "check_integration_grants",
    "check_registration_keys",
    "check_stale_logins",
]

# A finding of "every device" reads all three of what devices report.
_ALL_READS = frozenset(READ_KINDS)


def check_registration_keys(audit: Audit) -> Iterator[SecurityFinding]:
    """Usable registration keys that stay valid for long or can enroll many more devices."""
    keys = audit.session.exec(
        select(RegistrationKey).where(
            col(RegistrationKey.revoked_at).is_(None),
            RegistrationKey.expires_at > audit.now,
            col(RegistrationKey.uses) < col(RegistrationKey.max_uses),
        )
    )
    fix_tail = (
        "create keys that expire soon with only the uses you need "
        "(`edgefleet keys create --expires 24h --max-uses 1`)"
    )
    for key in keys:
        if key.expires_at > audit.now + audit.policy.key_max_lifetime:
            yield SecurityFinding(
                kind="key-long-lived",
                severity=Severity.MEDIUM,
                target=f"key:{key.id}",
                detail=(
                    f"registration key stays valid for another {span(key.expires_at - audit.now)} "
                    f"({when(key.expires_at)}); anyone holding it can enroll a device"
                ),
                fix=f"revoke it when its devices are enrolled (`edgefleet keys revoke {key.id}`); "
                + fix_tail,
            )
        left = key.max_uses - key.uses
        if left > audit.policy.key_max_uses_left:
            yield SecurityFinding(
                kind="key-many-uses",
                severity=Severity.MEDIUM,
                target=f"key:{key.id}",
                detail=f"registration key can still enroll {left} devices ({key.uses} used)",
                fix=f"revoke it (`edgefleet keys revoke {key.id}`) and " + fix_tail,
            )


def check_integration_grants(audit: Audit) -> Iterator[SecurityFinding]:
    """Integrations that read every device (no tag), above all when they read everything.

    Sites never show here: a site bridge always has a tag (fleet_service/sites.py)."""
    integrations = audit.session.exec(
        select(Integration).where(
            col(Integration.revoked_at).is_(None), col(Integration.tag).is_(None)
        )
    )
    for integration in integrations:
        holder = integration_holder(integration)
        reads = sorted(integration.grants)
        everything = set(reads) >= _ALL_READS
        yield SecurityFinding(
            kind="integration-broad",
            severity=Severity.MEDIUM if everything else Severity.LOW,
            target=holder.target,
            detail=f"reads {', '.join(reads) or 'nothing'} of every device (no tag limits it)",
            fix=(
                f"if it needs fewer devices or topics, revoke it ({holder.revoke}) and create it "
                "again with --tag key=value and only the topics it reads (--read results)"
            ),
        )


def check_stale_logins(audit: Audit) -> Iterator[SecurityFinding]:
    """Enabled users who have not logged in for long, or never since they were created."""
    cutoff = audit.now - audit.policy.login_stale_after
    users = audit.session.exec(
        select(User).where(
            col(User.disabled_at).is_(None),
            or_(
                col(User.last_login_at) < cutoff,
                and_(col(User.last_login_at).is_(None), col(User.created_at) < cutoff),
            ),
        )
    )
    for user in users:
        detail = (
            f"{user.role} {user.username} last logged in {span(audit.now - user.last_login_at)} "
            f"ago ({when(user.last_login_at)})"
            if user.last_login_at is not None
            else f"{user.role} {user.username} never logged in since {when(user.created_at)}"
        )
        yield SecurityFinding(
            kind="login-stale",
            severity=by_role(user.role),
            target=f"user:{user.username}",
            detail=detail,
            fix=(
                "disable the account if nobody uses it "
                f'(PATCH /api/v1/users/{user.username} {{"disabled": true}})'
            ),
        )


def check_api_tokens(audit: Audit) -> Iterator[SecurityFinding]:
    """Live API tokens that expire far in the future or have not been used for long."""
    tokens = audit.session.exec(
        select(ApiToken).where(col(ApiToken.revoked_at).is_(None), ApiToken.expires_at > audit.now)
    )
    unused_cutoff = audit.now - audit.policy.token_unused_after
    for token in tokens:
        target = f"token:{token.id}"
        fix = (
            f"revoke it (POST /api/v1/tokens/{token.id}/revoke) and create one with a shorter "
            'expires_in (e.g. "90d") for the automation that still needs it'
        )
        severity = by_role(token.role)
        if token.expires_at > audit.now + audit.policy.token_max_lifetime:
            yield SecurityFinding(
                kind="token-long-lived",
                severity=severity,
                target=target,
                detail=(
                    f"{token.role} token {token.name!r} stays valid for another "
                    f"{span(token.expires_at - audit.now)} ({when(token.expires_at)})"
                ),
                fix=fix,
            )
        last = token.last_used_at or token.created_at
        if last < unused_cutoff:
            used = "last used" if token.last_used_at else "never used since it was created"
            yield SecurityFinding(
                kind="token-unused",
                severity=severity,
                target=target,
                detail=f"{token.role} token {token.name!r} {used} {span(audit.now - last)} ago",
                fix=fix,
            )


def check_admin_count(audit: Audit) -> Iterator[SecurityFinding]:
    """More enabled admins than the policy's few: each one can hand out access."""
    admins = audit.session.exec(
        select(User.username)
        .where(User.role == "admin", col(User.disabled_at).is_(None))
        .order_by(col(User.username))
    ).all()
    if len(admins) > audit.policy.max_admins:
        yield SecurityFinding(
            kind="too-many-admins",
            severity=Severity.LOW,
            target="users",
            detail=(
                f"{len(admins)} enabled admins ({', '.join(admins)}); more than "
                f"{audit.policy.max_admins} can each create users, tokens and integrations"
            ),
            fix=(
                "give people who run the fleet the operator role, or viewer to watch it "
                '(PATCH /api/v1/users/NAME {"role": "operator"})'
            ),
        )
