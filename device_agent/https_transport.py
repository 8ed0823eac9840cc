"""The HTTPS fallback transport: poll commands and desired state, post outbox entries.

A device that cannot keep an MQTT session (port 8883 blocked, a network that only lets an HTTP
proxy out) still talks to the service through its HTTPS API, ``/api/v1/agent/*``, with the
device token from enrollment, verifying the server against the fleet CA pinned at enrollment.
httpx honours ``HTTPS_PROXY`` and ``NO_PROXY`` from the environment, which is how a proxy-only
network is reached. The service stores what is posted here exactly like what arrives over MQTT,
and its answer names the stored ids: the same receipt, delivered synchronously.

httpx errors never leave this module; they become::

    AgentError
    └── HttpsTransportError        an HTTPS fallback call failed; the next round tries again
        ├── HttpsUnreachableError  no HTTP answer: network, DNS, proxy, timeout, untrusted TLS
        ├── HttpsRefusedError      the service answered with an error status (token revoked, 5xx)
        └── HttpsResponseError     the answer is not what the endpoint documents

Opening the transport raises :class:`~device_agent.errors.CorruptStateError` when the token or
the CA cannot be read from the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from device_agent.config import AgentSettings
from device_agent.errors import AgentError, CorruptStateError
from device_agent.http_answers import caused_by_cert_verification, problem_detail
from device_agent.outbox import OutboxEntry
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import CommandMessage, DesiredState, MalformedPayloadError, TopicKind, decode

__all__ = [
    "COMMANDS_PATH",
    "DESIRED_PATH",
    "MAX_MESSAGES_PER_POST",
    "MAX_POST_BYTES",
    "MESSAGES_PATH",
    "POSTABLE_KINDS",
    "HttpsRefusedError",
    "HttpsResponseError",
    "HttpsTransport",
    "HttpsTransportError",
    "HttpsUnreachableError",
    "PostReceipt",
    "load_service_credentials",
]

logger = logging.getLogger(__name__)

COMMANDS_PATH = "/api/v1/agent/commands"
DESIRED_PATH = "/api/v1/agent/desired"
MESSAGES_PATH = "/api/v1/agent/messages"

# What POST /api/v1/agent/messages takes: every kind a device publishes except status, whose
# retained birth and Last Will only mean something on the broker. A result names its model in its
# payload, so it needs no topic.
POSTABLE_KINDS: frozenset[TopicKind] = frozenset(
    {TopicKind.TELEMETRY, TopicKind.ACKS, TopicKind.LOGS, TopicKind.REPORTED, TopicKind.RESULTS}
)

# The service refuses a POST of more messages than this (fleet_service/api/routes/agent.py);
# the agent may not import the service, so the number is repeated here.
MAX_MESSAGES_PER_POST = 500
# Payload bytes per POST: a request on a slow link must finish well within http_timeout_s
# (1 MiB is ~30 s at 300 kbit/s); a single larger entry still goes alone.
MAX_POST_BYTES = 1024 * 1024


class HttpsTransportError(AgentError):
    """An HTTPS fallback call failed; nothing was lost, the next round tries again."""


class HttpsUnreachableError(HttpsTransportError):
    """No HTTP answer from the service: refused, timed out, proxy failure, or untrusted TLS."""


class HttpsRefusedError(HttpsTransportError):
    """The service answered with an error status (a revoked device token, a server error)."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        hint = (
            "the device token is not accepted: the device was revoked or re-enrolled elsewhere"
            if status == httpx.codes.UNAUTHORIZED
            else "the service will be asked again at the next poll"
        )
        super().__init__(f"{url} answered {status}: {detail}; {hint}")
        self.url = url
        self.status = status
        self.detail = detail


class HttpsResponseError(HttpsTransportError):
    """The service's answer does not have the shape its endpoint documents."""


@dataclass(frozen=True, slots=True)
class PostReceipt:
    """The service's answer to posted outbox entries, by message id.

    ``stored`` are committed (delete them from the outbox); ``rejected`` will never be stored
    (bad payloads), with the reason, so they are dropped too. Entries in neither were not taken
    (a kind the endpoint does not accept) and stay in the outbox.
    """

    stored: frozenset[str]
    rejected: Mapping[str, str]


class HttpsTransport:
    """An open HTTPS client for one device's fallback endpoints; see the module docstring."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, identity: DeviceIdentity, state: StateDir, settings: AgentSettings
    ) -> AsyncIterator[HttpsTransport]:
        """A transport for ``identity`` at its ``service_url``; the client closes on exit.

        Reads the CA and the token from ``state`` (in a thread: small files, but still disk).
        """
        context, token = await asyncio.to_thread(load_service_credentials, state)
        client = httpx.AsyncClient(
            base_url=identity.service_url,
            verify=context,
            headers={"Authorization": f"Bearer {token}"},
            # A black-holed address costs connect_timeout_s, like an MQTT connect; a slow link
            # gets http_timeout_s per read or write.
            timeout=httpx.Timeout(settings.http_timeout_s, connect=settings.connect_timeout_s),
        )
        async with client:
            yield cls(client)

    async def poll_commands(self) -> list[CommandMessage]:
        """The commands waiting for this device, oldest first.

        The service keeps returning a command until the device's first ack for it is stored,
        so the caller must not hand one command to the processor twice. An element that is not
        a command is logged and skipped, the others still count.
        """
        body = await self._get_json(COMMANDS_PATH)
        if not isinstance(body, list):
            raise HttpsResponseError(
                f"{self._url(COMMANDS_PATH)} answered {type(body).__name__}, not a list of "
                "commands; check that agent and service versions match"
            )
        commands: list[CommandMessage] = []
        for item in body:
            try:
                commands.append(CommandMessage.model_validate(item))
            except ValidationError as exc:
                logger.warning(
                    "skipped a polled command that is not one (%s); check that agent and "
                    "service versions match",
                    exc.errors()[0]["msg"],
                )
        return commands

    async def fetch_desired(self) -> DesiredState:
        """This device's desired state, as retained on MQTT ``desired``."""
        response = await self._request("GET", DESIRED_PATH)
        try:
            return decode(DesiredState, response.content)
        except MalformedPayloadError as exc:
            raise HttpsResponseError(
                f"{self._url(DESIRED_PATH)} answered with no desired state ({exc}); check that "
                "agent and service versions match"
            ) from exc

    async def send(self, entries: Sequence[OutboxEntry]) -> PostReceipt:
        """Post the entries of :data:`POSTABLE_KINDS` in order; what the service stored.

        Entries of other kinds are left out (they stay in the outbox). An entry whose stored
        payload is not a JSON object is reported as rejected without being sent. Several POSTs
        are made when the entries exceed :data:`MAX_MESSAGES_PER_POST` or
        :data:`MAX_POST_BYTES`; if one fails, the error is raised and what the earlier ones
        stored is forgotten (it is sent again later, and the service receipts duplicates).
        """
        stored: set[str] = set()
        rejected: dict[str, str] = {}
        batch: list[tuple[str, dict[str, Any]]] = []
        batch_bytes = 0
        for entry in entries:
            if entry.kind not in POSTABLE_KINDS:
                continue
            payload = _json_object(entry.payload)
            if payload is None:
                rejected[entry.message_id] = "the stored payload is not a JSON object"
                continue
            if batch and (
                len(batch) >= MAX_MESSAGES_PER_POST
                or batch_bytes + len(entry.payload) > MAX_POST_BYTES
            ):
                await self._post(batch, stored, rejected)
                batch, batch_bytes = [], 0
            batch.append((entry.message_id, {"kind": entry.kind.value, "payload": payload}))
            batch_bytes += len(entry.payload)
        if batch:
            await self._post(batch, stored, rejected)
        return PostReceipt(stored=frozenset(stored), rejected=rejected)

    async def _post(
        self,
        batch: list[tuple[str, dict[str, Any]]],
        stored: set[str],
        rejected: dict[str, str],
    ) -> None:
        response = await self._request(
            "POST", MESSAGES_PATH, json={"messages": [message for _, message in batch]}
        )
        try:
            body = response.json()
            stored.update(str(message_id) for message_id in body["stored"])
            for item in body["rejected"]:
                message_id, _ = batch[int(item["index"])]
                rejected[message_id] = str(item["reason"])
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise HttpsResponseError(
                f"{self._url(MESSAGES_PATH)} answered with no receipt ({type(exc).__name__}: "
                f"{exc}); check that agent and service versions match"
            ) from exc

    async def _get_json(self, path: str) -> object:
        response = await self._request("GET", path)
        try:
            body: object = response.json()
        except ValueError as exc:
            raise HttpsResponseError(
                f"{self._url(path)} did not answer with JSON; is a proxy in the way?"
            ) from exc
        return body

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; httpx errors and non-2xx answers become HttpsTransportError."""
        url = self._url(path)
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            if caused_by_cert_verification(exc):
                raise HttpsUnreachableError(
                    f"the TLS certificate of {url} is not signed by the pinned fleet CA ({exc}); "
                    "something between the device and the service intercepts HTTPS (a TLS "
                    "inspecting proxy must let this host through untouched)"
                ) from exc
            raise HttpsUnreachableError(
                f"cannot reach the fleet service at {url} ({type(exc).__name__}: {exc}); check "
                "the device's network, and HTTPS_PROXY if it must go through a proxy"
            ) from exc
        if not response.is_success:
            raise HttpsRefusedError(url, response.status_code, problem_detail(response))
        return response

    def _url(self, path: str) -> str:
        return str(self._client.base_url.join(path))


def load_service_credentials(state: StateDir) -> tuple[ssl.SSLContext, str]:
    """The TLS context trusting only the pinned fleet CA, and the device token: what every HTTPS
    call of the agent to its service uses (the fallback, artifact routes)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=state.ca_path)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        token = state.read_token()
    except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; named for the reader
        raise CorruptStateError(
            f"cannot load the fleet CA or the device token from {state.root} ({exc}); enroll "
            f"again with `edgefleet-agent enroll TOKEN --state-dir {state.root} --force`"
        ) from exc
    if not token:
        raise CorruptStateError(
            f"{state.token_path} is empty; enroll again with `edgefleet-agent enroll TOKEN "
            f"--state-dir {state.root} --force`"
        )
    return context, token


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The stored payload as the JSON object the endpoint's ``payload`` field wants."""
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
