"""The webhook sender: post each due delivery, signed, and retry failures with backoff.

One named task per service process (``webhook-sender``) runs a pass whenever a stored result
wakes it (``webhook-wakeup`` listens to the event hub) and every ``webhook_poll_s`` otherwise.
A pass:

1. claims up to :data:`SEND_BATCH` due deliveries in one short transaction (``FOR UPDATE SKIP
   LOCKED`` on PostgreSQL, so replicas never claim the same one; SQLite has one writer), counts
   the attempt and leases them for the request timeout plus :data:`CLAIM_MARGIN_S`, so a
   delivery whose claimer dies is taken up again once the lease runs out;
2. posts them concurrently, each bounded by ``webhook_timeout_s``, never following redirects;
3. records each outcome: a 2xx is ``delivered``; anything else (or a network error) is retried
   after an exponential, jittered wait, and marked ``failed`` after ``webhook_max_attempts``.

Delivery is at least once: a crash between a receiver's 2xx and the outcome's commit sends it
again, with the same ``X-Edgefleet-Delivery`` id for the receiver to drop the repeat.

Every request is signed Stripe-style: ``X-Edgefleet-Signature: t=<unix time>,v1=<hex
HMAC-SHA256(secret, f"{t}.{body}")>``, body being the exact bytes sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from fleet_service import __version__
from fleet_service.config import ServiceSettings
from fleet_service.db import session_scope
from fleet_service.events import EventHub
from fleet_service.tables import Webhook, WebhookDelivery
from fleet_service.webhooks import WebhookUrlError, check_url

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "SenderSettings",
    "WebhookSender",
    "backoff_s",
    "delivery_body",
    "sign",
]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Edgefleet-Signature"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
EVENT_HEADER = "X-Edgefleet-Event"
WEBHOOK_HEADER = "X-Edgefleet-Webhook"

# Deliveries claimed and posted at once per pass: enough to keep up with a busy fleet, few
# enough that one pass's sockets stay modest. A full batch is followed by another pass at once.
SEND_BATCH = 32
# A claimed delivery is left to its claimer this long beyond the request timeout (which bounds
# the whole request): time to record the outcome. Past it, another pass (any replica, or this
# service after a crash) takes it up again.
CLAIM_MARGIN_S = 5.0
# How much of a failing receiver's answer lands in the delivery log, to say why it failed.
ERROR_BODY_CHARS = 200
_LAST_ERROR_CHARS = 500  # the column's size


@dataclass(frozen=True)
class SenderSettings:
    """The sender's knobs (the ``webhook_*`` service settings)."""

    poll_s: float = 2.0
    timeout_s: float = 10.0
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    max_attempts: int = 12
    require_https: bool = True

    @classmethod
    def of(cls, settings: ServiceSettings) -> SenderSettings:
        """The sender's part of the service settings."""
        return cls(
            poll_s=settings.webhook_poll_s,
            timeout_s=settings.webhook_timeout_s,
            retry_base_s=settings.webhook_retry_base_s,
            retry_max_s=settings.webhook_retry_max_s,
            max_attempts=settings.webhook_max_attempts,
            require_https=settings.webhook_require_https,
        )


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Edgefleet-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def delivery_body(webhook_id: str, delivery_id: int, result: dict[str, Any]) -> bytes:
    """What a delivery posts: the result as ``GET /api/v1/results`` shows it, and who sent it."""
    body = {
        "event": "result",
        "webhook_id": webhook_id,
        "delivery_id": delivery_id,
        "result": result,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def backoff_s(attempts: int, settings: SenderSettings, rng: random.Random) -> float:
    """The wait before the attempt after ``attempts`` failed ones: base doubled per failure,
    capped, then jittered into its upper half (never shorter than half the nominal wait)."""
    nominal = min(settings.retry_max_s, settings.retry_base_s * 2.0 ** max(0, attempts - 1))
    return nominal * rng.uniform(0.5, 1.0)


@dataclass(frozen=True)
class _Claimed:
    id: int
    webhook_id: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int  # including the one about to be made


@dataclass(frozen=True)
class _Outcome:
    claimed: _Claimed
    delivered: bool
    status: int | None = None
    error: str | None = None
    final: bool = False  # no point retrying (the URL is refused)
    retry_after_s: float | None = None  # the receiver's Retry-After, when it gave one


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _clip(text: str) -> str:
    return text if len(text) <= _LAST_ERROR_CHARS else text[: _LAST_ERROR_CHARS - 3] + "..."


class WebhookSender:
    """Owns the ``webhook-sender`` loop; ``wake()`` when deliveries were queued."""

    def __init__(
        self,
        engine: Engine,
        hub: EventHub,
        settings: SenderSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._hub = hub
        self._settings = settings
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not a secret
        self._wakeup = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    def wake(self) -> None:
        """Run a pass now rather than at the next poll."""
        self._wakeup.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WebhookSender]:
        """Run the sender until the context exits."""
        # No redirects: a 3xx is a failed attempt, so a receiver cannot bounce signed results
        # to another host.
        async with (
            httpx.AsyncClient(
                timeout=self._settings.timeout_s,
                follow_redirects=False,
                headers={"User-Agent": f"edgefleet/{__version__} webhooks"},
            ) as client,
            asyncio.TaskGroup() as group,
        ):
            self._client = client
            tasks = [
                group.create_task(self._run(), name="webhook-sender"),
                group.create_task(self._wake_on_results(), name="webhook-wakeup"),
            ]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()

    async def _wake_on_results(self) -> None:
        async with self._hub.subscribe() as events:
            while True:
                name, _ = await events.get()
                if name == "result":
                    self.wake()

    async def _run(self) -> None:
        while True:
            try:
                more = await self._pass()
            except Exception:  # supervisor loop: log and keep sending
                logger.exception("webhook sender pass failed; retrying")
                more = False
            if more:
                continue
            self._wakeup.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._settings.poll_s)

    async def _pass(self) -> bool:
        claimed = await asyncio.to_thread(self._claim, datetime.now(UTC))
        if not claimed:
            return False
        outcomes = await asyncio.gather(*(self._post(c) for c in claimed))
        await asyncio.to_thread(self._record, outcomes, datetime.now(UTC))
        return len(claimed) == SEND_BATCH

    # --- claim (blocking: in a thread) ---------------------------------------------------------

    def _due(self, now: datetime) -> Any:
        return (
            select(WebhookDelivery, Webhook)
            .join(Webhook, col(Webhook.id) == col(WebhookDelivery.webhook_id))
            .where(col(WebhookDelivery.state) == "pending")
            .where(col(WebhookDelivery.next_attempt_at) <= now)
            .where(col(Webhook.disabled_at).is_(None))
        )

    def _claim(self, now: datetime) -> list[_Claimed]:
        try:
            with session_scope(self._engine) as session:
                # A plain read first: an idle pass never takes SQLite's one write lock.
                if session.exec(self._due(now).limit(1)).first() is None:
                    return []
                self._lock(session)
                rows = session.exec(
                    self._due(now)
                    .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id))
                    .limit(SEND_BATCH)
                    .with_for_update(skip_locked=True, of=WebhookDelivery)
                ).all()
                lease = now + timedelta(seconds=self._settings.timeout_s + CLAIM_MARGIN_S)
                claimed = []
                for delivery, webhook in rows:
                    assert delivery.id is not None  # stored rows have one
                    if delivery.attempts >= self._settings.max_attempts:
                        # Its last attempt's claimer died before recording an outcome.
                        delivery.state = "failed"
                        delivery.last_error = delivery.last_error or "no answer was recorded"
                        session.add(delivery)
                        continue
                    delivery.attempts += 1
                    delivery.next_attempt_at = lease
                    session.add(delivery)
                    claimed.append(
                        _Claimed(
                            delivery.id,
                            webhook.id,
                            webhook.url,
                            webhook.secret,
                            dict(delivery.payload),
                            delivery.attempts,
                        )
                    )
                return claimed
        except OperationalError as exc:
            if self._engine.dialect.name != "sqlite":
                raise
            # SQLite's one writer was busy past its timeout: the next pass tries again.
            logger.warning("webhook deliveries not claimed this pass: %s", exc)
            return []

    def _lock(self, session: Session) -> None:
        if session.get_bind().dialect.name != "sqlite":
            return  # FOR UPDATE SKIP LOCKED in the query does it
        # pysqlite opens a transaction only at the first write, so FOR UPDATE means nothing
        # there: a write that changes nothing takes SQLite's single write lock now, and the
        # rows read next cannot change under this pass before it commits.
        session.execute(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == -1)
            .values(state=WebhookDelivery.state)
        )

    # --- post -----------------------------------------------------------------------------------

    async def _post(self, claimed: _Claimed) -> _Outcome:
        assert self._client is not None  # set by running()
        try:
            check_url(claimed.url, require_https=self._settings.require_https)
        except WebhookUrlError as exc:
            return _Outcome(claimed, delivered=False, error=exc.detail, final=True)
        body = delivery_body(claimed.webhook_id, claimed.id, claimed.payload)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(claimed.secret, timestamp, body),
            DELIVERY_HEADER: str(claimed.id),
            EVENT_HEADER: "result",
            WEBHOOK_HEADER: claimed.webhook_id,
        }
        try:
            # httpx's timeout is per read; this bounds the whole exchange, as the claim's lease
            # assumes, however slowly a receiver drips its answer.
            async with (
                asyncio.timeout(self._settings.timeout_s),
                self._client.stream("POST", claimed.url, content=body, headers=headers) as response,
            ):
                status = response.status_code
                if 200 <= status < 300:
                    return _Outcome(claimed, delivered=True, status=status)
                return _Outcome(
                    claimed,
                    delivered=False,
                    status=status,
                    error=await _failure_text(response),
                    retry_after_s=_retry_after(response),
                )
        except httpx.InvalidURL as exc:  # stored before check_url knew better
            return _Outcome(claimed, delivered=False, error=_clip(str(exc)), final=True)
        except (TimeoutError, httpx.TimeoutException):
            error = f"no answer within {self._settings.timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {str(exc) or 'the request failed'}"
        return _Outcome(claimed, delivered=False, error=_clip(error))

    # --- record (blocking: in a thread) ---------------------------------------------------------

    def _record(self, outcomes: list[_Outcome], now: datetime) -> None:
        with session_scope(self._engine) as session:
            for outcome in outcomes:
                session.execute(self._outcome_update(outcome, now))
        for outcome in outcomes:
            claimed = outcome.claimed
            if outcome.delivered:
                logger.debug("webhook %s: delivery %s sent", claimed.webhook_id, claimed.id)
                continue
            gave_up = self._gives_up(outcome)
            logger.log(
                logging.WARNING if gave_up else logging.INFO,
                "webhook %s: delivery %s attempt %d failed%s: %s",
                claimed.webhook_id,
                claimed.id,
                claimed.attempts,
                "; giving up" if gave_up else "; will retry",
                outcome.error,
            )

    def _gives_up(self, outcome: _Outcome) -> bool:
        return outcome.final or outcome.claimed.attempts >= self._settings.max_attempts

    def _outcome_update(self, outcome: _Outcome, now: datetime) -> Any:
        claimed = outcome.claimed
        query = update(WebhookDelivery).where(col(WebhookDelivery.id) == claimed.id)
        if outcome.delivered:
            return query.values(
                state="delivered", last_status=outcome.status, last_error=None, delivered_at=now
            )
        # A delivery cancelled (its webhook disabled) while this attempt ran stays cancelled.
        query = query.where(col(WebhookDelivery.state) == "pending")
        if self._gives_up(outcome):
            return query.values(
                state="failed", last_status=outcome.status, last_error=outcome.error
            )
        wait = backoff_s(claimed.attempts, self._settings, self._rng)
        if outcome.retry_after_s is not None:
            wait = max(wait, min(outcome.retry_after_s, self._settings.retry_max_s))
        return query.values(
            last_status=outcome.status,
            last_error=outcome.error,
            next_attempt_at=now + timedelta(seconds=wait),
        )


async def _failure_text(response: httpx.Response) -> str:
    """``HTTP 503: <the start of the receiver's answer>``, read no further than needed."""
    status = response.status_code
    if 300 <= status < 400:
        return (
            f"HTTP {status}: redirects are not followed; point the webhook at the final URL "
            f"({response.headers.get('location', 'no Location given')})"
        )
    head = b""
    with suppress(httpx.HTTPError):
        async for chunk in response.aiter_raw():
            head += chunk
            if len(head) >= ERROR_BODY_CHARS:
                break
    text = head[:ERROR_BODY_CHARS].decode(errors="replace").strip()
    return _clip(f"HTTP {status}: {text}" if text else f"HTTP {status}")
