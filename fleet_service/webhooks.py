"""Webhooks: HTTP endpoints that receive inference results, and the deliveries queued for them.

An admin creates a webhook (a name, a URL, optional model and device-tag filters); its HMAC
secret is generated here and shown once. When ingestion stores a result,
:func:`queue_deliveries` adds one pending delivery per matching enabled webhook in the same
transaction, so a stored result always has its deliveries (a crash loses neither), and one
delivery per webhook and result message id however often the device resends it. The sender
(:mod:`fleet_service.webhook_delivery`) posts them.

Errors: :class:`WebhookUrlError` (422) for a URL the service will not post to; otherwise the
service's own tree (``NotFoundError``, ``ConflictError``).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_protocol.manifest import MODEL_NAME_PATTERN
from fleet_service.audit import record
from fleet_service.errors import ConflictError, NotFoundError, ServiceError
from fleet_service.roles import Principal, parse_tag
from fleet_service.schemas import ResultPublic
from fleet_service.tables import Device, Webhook, WebhookDelivery

__all__ = [
    "MAX_DELIVERIES",
    "DeliveriesPublic",
    "DeliveryPublic",
    "DeliveryState",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookPublic",
    "WebhookUrlError",
    "check_url",
    "create_webhook",
    "disable_webhook",
    "list_deliveries",
    "list_webhooks",
    "queue_deliveries",
]

# Rows one delivery-log listing returns at most.
MAX_DELIVERIES = 1000
# How many models one webhook may name: a filter, not a catalogue.
MAX_MODELS = 100
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # as registration-key tags (schemas.TagKey)

# pending: waiting for its (next) attempt; delivered: a 2xx came back; failed: out of attempts
# or refused for good; cancelled: its webhook was disabled before it went out.
DeliveryState = Literal["pending", "delivered", "failed", "cancelled"]


class WebhookUrlError(ServiceError):
    """A webhook URL the service refuses to post results to."""

    status = 422
    title = "webhook URL refused"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, require_https: bool) -> None:
    """Refuse anything but an absolute http(s) URL with a host, and plain http off loopback
    when ``require_https`` (the ``webhook_require_https`` setting)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # parses the port: a bad one raises ValueError here
        httpx.URL(url)  # what the sender will parse: control characters, bad hosts
    except (ValueError, httpx.InvalidURL) as exc:
        raise WebhookUrlError(f"webhook URL {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError(
            f"webhook URL {url!r}: only https:// (or http:// to loopback) URLs are posted to, "
            f"not {parts.scheme or 'a URL without a scheme'}"
        )
    if not parts.hostname:
        raise WebhookUrlError(f"webhook URL {url!r} has no host; give e.g. https://host/path")
    if parts.scheme == "http" and require_https and not _is_loopback(parts.hostname):
        raise WebhookUrlError(
            f"webhook URL {url!r} is plain http to {parts.hostname}, which would send results "
            "in clear: use https://, or set webhook_require_https false to allow it"
        )


class WebhookCreate(BaseModel):
    """``POST /webhooks``: where to post results, and which ones (every result by default)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    ]
    url: Annotated[str, Field(min_length=1, max_length=2000)]
    # Only results of these models; empty means every model.
    models: Annotated[
        list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]], Field(max_length=MAX_MODELS)
    ] = Field(default_factory=list)
    # Only results of devices carrying this tag, as key=value.
    tag: Annotated[str, Field(max_length=200)] | None = None

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key, _ = parse_tag(value)
        if not _TAG_KEY.fullmatch(key):
            raise ValueError(f"tag key {key!r}: use 1-64 of A-Z, a-z, 0-9, '_', '.', '-'")
        return value


class WebhookPublic(BaseModel):
    """A webhook as the API shows it (never its secret)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    url: str
    models: list[str]
    tag: str | None
    created_by: str
    created_at: AwareDatetime
    disabled_at: AwareDatetime | None
    enabled: bool


class WebhookCreated(BaseModel):
    """The answer to a create: the webhook and its signing secret, shown only this once."""

    model_config = ConfigDict(frozen=True)

    webhook: WebhookPublic
    secret: str


class DeliveryPublic(BaseModel):
    """One result's delivery to one webhook, as the delivery log shows it."""

    model_config = ConfigDict(frozen=True)

    id: int
    message_id: str
    state: DeliveryState
    attempts: int
    last_status: int | None  # the HTTP status of the last attempt, if one came back
    last_error: str | None
    next_attempt_at: AwareDatetime | None  # only while pending
    created_at: AwareDatetime
    delivered_at: AwareDatetime | None


class DeliveriesPublic(BaseModel):
    """``GET /webhooks/{id}/deliveries``: newest first."""

    model_config = ConfigDict(frozen=True)

    deliveries: list[DeliveryPublic]


def webhook_public(row: Webhook) -> WebhookPublic:
    """The API shape of a stored webhook."""
    return WebhookPublic(
        id=row.id,
        name=row.name,
        url=row.url,
        models=list(row.models),
        tag=row.tag,
        created_by=row.created_by,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
        enabled=row.disabled_at is None,
    )


def _delivery_public(row: WebhookDelivery) -> DeliveryPublic:
    assert row.id is not None  # stored rows have one
    state: DeliveryState = row.state  # type: ignore[assignment]  # only these are written
    return DeliveryPublic(
        id=row.id,
        message_id=row.message_id,
        state=state,
        attempts=row.attempts,
        last_status=row.last_status,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def create_webhook(
    session: Session, body: WebhookCreate, *, by: Principal, require_https: bool
) -> WebhookCreated:
    """Store a webhook with a new secret, audited as ``webhook.create``."""
    check_url(body.url, require_https=require_https)
    if session.exec(select(Webhook.id).where(Webhook.name == body.name)).first() is not None:
        raise ConflictError(f"a webhook named {body.name!r} exists; pick another name")
    row = Webhook(
        id="wh-" + secrets.token_hex(8),
        name=body.name,
        url=body.url,
        secret="whsec_" + secrets.token_urlsafe(32),
        models=sorted(set(body.models)),
        tag=body.tag,
        created_by=by.name,
        created_at=datetime.now(UTC),
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent create took the name first
        raise ConflictError(f"a webhook named {body.name!r} exists; pick another name") from exc
    detail = {"name": row.name, "url": row.url, "models": row.models, "tag": row.tag}
    record(session, by, "webhook.create", row.id, detail=detail)
    return WebhookCreated(webhook=webhook_public(row), secret=row.secret)


def list_webhooks(session: Session) -> list[WebhookPublic]:
    """Every webhook, enabled or not, oldest first."""
    rows = session.exec(select(Webhook).order_by(col(Webhook.created_at), col(Webhook.id)))
    return [webhook_public(row) for row in rows]


def _get(session: Session, webhook_id: str) -> Webhook:
    row = session.get(Webhook, webhook_id)
    if row is None:
        raise NotFoundError(f"no webhook {webhook_id!r}; list them with GET /api/v1/webhooks")
    return row


def disable_webhook(session: Session, webhook_id: str, *, by: Principal) -> WebhookPublic:
    """Stop a webhook for good (audited as ``webhook.disable``); its pending deliveries are
    cancelled, and the log is kept."""
    row = _get(session, webhook_id)
    if row.disabled_at is not None:
        raise ConflictError(f"webhook {webhook_id!r} was already disabled at {row.disabled_at}")
    row.disabled_at = datetime.now(UTC)
    session.add(row)
    cancelled = session.connection().execute(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.webhook_id) == webhook_id)
        .where(col(WebhookDelivery.state) == "pending")
        .values(state="cancelled", last_error="the webhook was disabled before delivery")
    )
    detail = {"name": row.name, "cancelled_deliveries": cancelled.rowcount}
    record(session, by, "webhook.disable", row.id, detail=detail)
    return webhook_public(row)


def list_deliveries(session: Session, webhook_id: str, limit: int) -> DeliveriesPublic:
    """The newest ``limit`` deliveries of one webhook, newest first."""
    _get(session, webhook_id)
    rows = session.exec(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(col(WebhookDelivery.id).desc())
        .limit(min(limit, MAX_DELIVERIES))
    )
    return DeliveriesPublic(deliveries=[_delivery_public(row) for row in rows])


def _matches(webhook: Webhook, result: ResultPublic, device_tags: Mapping[str, str]) -> bool:
    if webhook.models and result.model not in webhook.models:
        return False
    if webhook.tag is not None:
        key, value = parse_tag(webhook.tag)
        return device_tags.get(key) == value
    return True


def _insert_once(session: Session) -> Any:
    # The unique (webhook, message id) pair is the last word when two writers race.
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]  # SQLModel sets it
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing(index_elements=["webhook_id", "message_id"])
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing(
            index_elements=["webhook_id", "message_id"]
        )
    return insert(table)


def queue_deliveries(
    session: Session, results: Sequence[ResultPublic], devices: Mapping[str, Device]
) -> int:
    """In the ingest writer's transaction: a pending delivery of each newly stored result to
    each enabled webhook it matches. Returns how many were queued."""
    if not results:
        return 0
    webhooks = list(session.exec(select(Webhook).where(col(Webhook.disabled_at).is_(None))))
    if not webhooks:
        return 0
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for result in results:
        device = devices.get(result.device_id)
        tags = device.tags if device is not None else {}
        payload: dict[str, Any] | None = None
        for webhook in webhooks:
            if not _matches(webhook, result, tags):
                continue
            payload = payload or result.model_dump(mode="json")
            rows.append(
                {
                    "webhook_id": webhook.id,
                    "message_id": result.message_id,
                    "payload": payload,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
            )
    if rows:
        session.connection().execute(_insert_once(session), rows)
    return len(rows)
