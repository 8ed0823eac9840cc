"""Webhooks against the real service, broker and database (SQLite and PostgreSQL): results
published by a device over MQTT reach a real HTTP receiver run here, signed (checked with this
file's own HMAC code), retried with backoff, logged, filtered, never sent twice for one result,
and kept across a service crash."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import col, select

from fleet_protocol import ModelRuntime, TopicKind
from fleet_service.db import session_scope
from fleet_service.tables import AuditEvent
from fleet_service.webhook_delivery import SenderSettings, backoff_s, sign
from fleet_service.webhooks import WebhookUrlError, check_url
from tests.fixtures.fleet import Fleet, free_tcp_port, start_fleet, wait_until
from tests.test_deployments import Device, make_release

# Fast retries so a test waits for seconds, not minutes: attempts ~0.2 s and ~0.4 s apart.
FAST_HOOKS = {
    "EDGEFLEET_WEBHOOK_RETRY_BASE_S": "0.2",
    "EDGEFLEET_WEBHOOK_RETRY_MAX_S": "0.5",
    "EDGEFLEET_WEBHOOK_MAX_ATTEMPTS": "3",
    "EDGEFLEET_WEBHOOK_POLL_S": "0.2",
    "EDGEFLEET_WEBHOOK_TIMEOUT_S": "2",
}
# How long "nothing more was posted" is watched for: several sender polls.
QUIET_S = 1.5
SIGNATURE_TOLERANCE_S = 300


# --- a real HTTP receiver ----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One POST as the receiver got it."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found


class Receiver:
    """An HTTP server in a thread: records every POST and answers with the scripted statuses
    (then 200); while ``hold`` is clear, requests wait for it before answering."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.statuses: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.hold.wait(30)
                answer = b"" if status < 300 else b"receiver says no"
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the sender is gone (a killed service): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def posts(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def close(self) -> None:
        self.hold.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def verify(secret: str, received: Received) -> None:
    """What an integrator does: recompute the HMAC over ``t.body`` and compare in constant
    time, and refuse old timestamps (replays)."""
    fields = dict(
        part.split("=", 1) for part in received.headers["x-edgefleet-signature"].split(",")
    )
    timestamp = int(fields["t"])
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + received.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"]), "signature does not match"
    assert abs(time.time() - timestamp) < SIGNATURE_TOLERANCE_S


# --- fleet helpers -----------------------------------------------------------------------------


@pytest.fixture
def hook_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path, database_url, extra_env=FAST_HOOKS)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def device(hook_fleet: Fleet) -> Iterator[Device]:
    raw = Device(hook_fleet, "camera")
    yield raw
    raw.close()


def create_webhook(fleet: Fleet, name: str, url: str, **body: Any) -> tuple[str, str]:
    """A webhook over REST; returns its id and secret."""
    response = fleet.api.post("/api/v1/webhooks", json={"name": name, "url": url, **body})
    assert response.status_code == 201, response.text
    created = response.json()
    return created["webhook"]["id"], created["secret"]


def deliveries(fleet: Fleet, webhook_id: str) -> list[dict[str, Any]]:
    response = fleet.api.get(f"/api/v1/webhooks/{webhook_id}/deliveries")
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["deliveries"]
    return found


def wait_delivery(fleet: Fleet, webhook_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (d := deliveries(fleet, webhook_id)) and d[0]["state"] == state and d[0],
        timeout=timeout,
        what=f"a {state} delivery",
    )
    return found


def stored_result(fleet: Fleet, message_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        response = fleet.api.get("/api/v1/results")
        response.raise_for_status()
        return next((r for r in response.json() if r["message_id"] == message_id), None)

    found: dict[str, Any] = wait_until(find, what=f"result {message_id} stored")
    return found


def same_instants(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its times parsed: one instant may be written with another UTC offset."""
    times = {k: datetime.fromisoformat(result[k]) for k in ("timestamp", "received_at")}
    return {**result, **times}


def audit_actions(fleet: Fleet, target: str) -> list[tuple[str, str]]:
    with session_scope(fleet.engine) as session:
        rows = session.exec(
            select(AuditEvent)
            .where(AuditEvent.target == target)
            .order_by(col(AuditEvent.at), col(AuditEvent.id))
        )
        return [(row.action, row.actor) for row in rows]


# --- end to end --------------------------------------------------------------------------------


def test_a_result_reaches_the_receiver_signed_with_the_secret_shown_once(
    hook_fleet: Fleet, device: Device, receiver: Receiver
) -> None:
    fleet = hook_fleet
    webhook_id, secret = create_webhook(fleet, "erp", receiver.url())
    assert secret.startswith("whsec_")
    listed = fleet.api.get("/api/v1/webhooks").json()
    assert [w["id"] for w in listed] == [webhook_id]
    assert secret not in json.dumps(listed), "the secret is shown once, at creation"
    assert listed[0]["enabled"] is True

    release = make_release(fleet, "detector", "1.0")
    message = device.result(release, label="cat", confidence=0.9)
    delivered = wait_delivery(fleet, webhook_id, "delivered")

    [post] = receiver.posts()
    verify(secret, post)
    assert post.headers["x-edgefleet-event"] == "result"
    assert post.headers["x-edgefleet-delivery"] == str(delivered["id"])
    assert post.headers["content-type"] == "application/json"
    body = post.json()
    assert (body["event"], body["webhook_id"], body["delivery_id"]) == (
        "result",
        webhook_id,
        delivered["id"],
    )
    # The result exactly as integrators read it over REST.
    assert same_instants(body["result"]) == same_instants(stored_result(fleet, message.message_id))
    assert body["result"]["label"] == "cat"
    assert delivered["message_id"] == message.message_id
    assert (delivered["attempts"], delivered["last_status"], delivered["last_error"]) == (
        1,
        200,
        None,
    )
    assert delivered["delivered_at"] is not None
    assert delivered["next_attempt_at"] is None
    assert audit_actions(fleet, webhook_id) == [("webhook.create", "admin")]


def test_a_receiver_failing_twice_gets_the_result_on_the_third_attempt(
    hook_fleet: Fleet, device: Device, receiver: Receiver
) -> None:
    fleet = hook_fleet
    receiver.statuses = [500, 503]
    webhook_id, secret = create_webhook(fleet, "flaky", receiver.url())
    release = make_release(fleet, "detector", "1.0")
    device.result(release, label="cat")

    delivered = wait_delivery(fleet, webhook_id, "delivered")
    assert (delivered["attempts"], delivered["last_status"]) == (3, 200)
    posts = receiver.posts()
    assert len(posts) == 3
    # Every attempt is the same delivery, freshly signed.
    assert {p.headers["x-edgefleet-delivery"] for p in posts} == {str(delivered["id"])}
    for post in posts:
        verify(secret, post)
    assert len({p.body for p in posts}) == 1


def test_a_receiver_down_past_max_attempts_leaves_a_failed_delivery_in_the_log(
    hook_fleet: Fleet, device: Device, receiver: Receiver
) -> None:
    fleet = hook_fleet
    down_id, _ = create_webhook(fleet, "down", f"http://127.0.0.1:{free_tcp_port()}/hook")
    refusing_id, _ = create_webhook(fleet, "refusing", receiver.url("/refusing"))
    receiver.statuses = [500, 500, 500]
    release = make_release(fleet, "detector", "1.0")
    message = device.result(release, label="cat")
    stored_result(fleet, message.message_id)  # ingestion does not wait for webhooks

    failed = wait_delivery(fleet, down_id, "failed")
    assert failed["attempts"] == 3
    assert failed["last_status"] is None
    assert "ConnectError" in failed["last_error"]
    refused = wait_delivery(fleet, refusing_id, "failed")
    assert (refused["attempts"], refused["last_status"]) == (3, 500)
    assert refused["last_error"] == "HTTP 500: receiver says no"
    time.sleep(QUIET_S)
    assert len(receiver.posts()) == 3, "a failed delivery is not tried again"
    assert deliveries(fleet, down_id)[0]["state"] == "failed"


def test_model_and_tag_filters_choose_which_results_a_webhook_gets(
    hook_fleet: Fleet, receiver: Receiver
) -> None:
    fleet = hook_fleet
    lab = Device(fleet, "lab-cam", fleet.create_key(tags={"site": "lab"})["join_token"])
    yard = Device(fleet, "yard-cam", fleet.create_key(tags={"site": "yard"})["join_token"])
    try:
        create_webhook(fleet, "detector-only", receiver.url("/models"), models=["detector"])
        create_webhook(fleet, "lab-only", receiver.url("/tag"), tag="site=lab")
        create_webhook(fleet, "lab-chat", receiver.url("/both"), models=["chat"], tag="site=lab")
        create_webhook(fleet, "everything", receiver.url("/all"))
        detector = make_release(fleet, "detector", "1.0")
        chat = make_release(fleet, "chat", "1.0", runtime=ModelRuntime.GGUF)
        sent = {
            ("lab", "detector"): lab.result(detector, label="cat").message_id,
            ("lab", "chat"): lab.result(chat, text="hi").message_id,
            ("yard", "detector"): yard.result(detector, label="dog").message_id,
            ("yard", "chat"): yard.result(chat, text="ho").message_id,
        }
        wait_until(lambda: len(receiver.posts("/all")) == 4, what="every result posted")
        time.sleep(QUIET_S)

        def got(path: str) -> set[str]:
            return {p.json()["result"]["message_id"] for p in receiver.posts(path)}

        assert got("/all") == set(sent.values())
        assert got("/models") == {sent["lab", "detector"], sent["yard", "detector"]}
        assert got("/tag") == {sent["lab", "detector"], sent["lab", "chat"]}
        assert got("/both") == {sent["lab", "chat"]}
        assert len(receiver.posts()) == 4 + 2 + 2 + 1
    finally:
        lab.close()
        yard.close()


def test_a_disabled_webhook_gets_nothing_and_a_redelivered_result_is_posted_once(
    hook_fleet: Fleet, device: Device, receiver: Receiver
) -> None:
    fleet = hook_fleet
    webhook_id, _ = create_webhook(fleet, "once", receiver.url())
    release = make_release(fleet, "detector", "1.0")
    first = device.result(release, label="cat")
    wait_delivery(fleet, webhook_id, "delivered")

    duplicates = fleet.stats()["duplicates"]
    device.raw.send(TopicKind.RESULTS, first, model="detector")  # an outbox replay
    wait_until(lambda: fleet.stats()["duplicates"] > duplicates, what="the replay counted")
    time.sleep(QUIET_S)
    assert len(receiver.posts()) == 1
    assert len(deliveries(fleet, webhook_id)) == 1

    response = fleet.api.post(f"/api/v1/webhooks/{webhook_id}/disable")
    assert response.status_code == 200, response.text
    assert (response.json()["enabled"], response.json()["disabled_at"] is not None) == (False, True)
    second = device.result(release, label="dog")
    stored_result(fleet, second.message_id)
    time.sleep(QUIET_S)
    assert len(receiver.posts()) == 1, "a disabled webhook got a result"
    assert [d["message_id"] for d in deliveries(fleet, webhook_id)] == [first.message_id]
    assert audit_actions(fleet, webhook_id) == [
        ("webhook.create", "admin"),
        ("webhook.disable", "admin"),
    ]

    again = fleet.api.post(f"/api/v1/webhooks/{webhook_id}/disable")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert "already disabled" in again.json()["detail"]


def test_a_queued_delivery_survives_a_service_crash_and_is_sent_after_restart(
    hook_fleet: Fleet, device: Device, receiver: Receiver
) -> None:
    fleet = hook_fleet
    webhook_id, secret = create_webhook(fleet, "crash", receiver.url())
    receiver.hold.clear()  # the receiver takes the first post and does not answer
    release = make_release(fleet, "detector", "1.0")
    device.result(release, label="cat")
    wait_until(lambda: receiver.posts(), what="the first attempt in flight")

    fleet.kill_service()
    receiver.hold.set()
    fleet.restart_service()
    # The killed attempt's claim runs out (timeout + margin) and the new process sends it.
    delivered = wait_delivery(fleet, webhook_id, "delivered", timeout=30)
    assert delivered["attempts"] == 2
    posts = receiver.posts()
    assert len(posts) == 2
    # At least once: the repeat carries the same delivery id, for the receiver to drop.
    assert {p.headers["x-edgefleet-delivery"] for p in posts} == {str(delivered["id"])}
    verify(secret, posts[-1])


def test_two_replicas_post_each_delivery_exactly_once(
    tmp_path: Path, database_url: str | None, receiver: Receiver
) -> None:
    fleet = start_fleet(tmp_path, database_url, replicas=("b",), extra_env=FAST_HOOKS)
    try:
        fleet.start_replica("b")
        webhook_id, _ = create_webhook(fleet, "shared", receiver.url())
        release = make_release(fleet, "detector", "1.0")
        camera = Device(fleet, "camera")
        try:
            sent = {camera.result(release, label=f"n{n}").message_id for n in range(40)}
        finally:
            camera.close()
        wait_until(
            lambda: len(receiver.posts()) >= len(sent), timeout=60, what="every result posted"
        )
        time.sleep(QUIET_S)
        posts = receiver.posts()
        ids = [p.headers["x-edgefleet-delivery"] for p in posts]
        assert len(ids) == len(set(ids)) == len(sent), "a delivery was posted twice"
        assert {p.json()["result"]["message_id"] for p in posts} == sent
        assert {d["state"] for d in deliveries(fleet, webhook_id)} == {"delivered"}
    finally:
        fleet.close()


# --- bad requests ------------------------------------------------------------------------------


BAD_CREATES: list[tuple[dict[str, Any], int, str]] = [
    ({"url": "not a url"}, 422, "only https://"),
    ({"url": "ftp://files.example.org/in"}, 422, "not ftp"),
    ({"url": "http://example.org/hook"}, 422, "webhook_require_https"),
    ({"url": "https:///hook"}, 422, "has no host"),
    ({"url": "https://example.org:99999/hook"}, 422, "not a valid URL"),
    ({"url": "https://example.org/hook", "models": ["Not A Model"]}, 422, "models.0"),
    ({"url": "https://example.org/hook", "tag": "site"}, 422, "key=value"),
    ({"url": "https://example.org/hook", "secret": "mine"}, 422, "secret"),
    ({"url": "https://example.org/hook", "name": "bad name"}, 422, "name"),
    ({"url": "https://example.org/hook", "name": "taken"}, 409, "exists"),
    ({"name": "no-url"}, 422, "url"),
]


def test_bad_webhook_requests_get_clear_problems(sqlite_fleet: Fleet) -> None:
    create_webhook(sqlite_fleet, "taken", "https://example.org/first")
    for body, status, says in BAD_CREATES:
        response = sqlite_fleet.api.post("/api/v1/webhooks", json={"name": "new", **body})
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert says in response.json()["detail"], (body, response.text)
    assert [w["name"] for w in sqlite_fleet.api.get("/api/v1/webhooks").json()] == ["taken"]
    api = sqlite_fleet.api
    for response in (
        api.post("/api/v1/webhooks/wh-nope/disable"),
        api.get("/api/v1/webhooks/wh-nope/deliveries"),
    ):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert "no webhook 'wh-nope'" in response.json()["detail"]

    webhook_id = api.get("/api/v1/webhooks").json()[0]["id"]
    for limit in (0, 1001):
        response = api.get(f"/api/v1/webhooks/{webhook_id}/deliveries", params={"limit": limit})
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
    with sqlite_fleet.anonymous() as anonymous:
        assert anonymous.get("/api/v1/webhooks").status_code == 401


# --- the CLI -----------------------------------------------------------------------------------


def run_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    process = fleet.cli("webhooks", *args)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_cli_creates_lists_disables_and_shows_deliveries(
    sqlite_fleet: Fleet, receiver: Receiver
) -> None:
    fleet = sqlite_fleet
    created = run_cli(
        fleet, "create", "erp", "--url", receiver.url(), "--model", "detector", "--tag", "site=lab"
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    [webhook] = fleet.api.get("/api/v1/webhooks").json()
    assert (webhook["models"], webhook["tag"]) == (["detector"], "site=lab")
    assert audit_actions(fleet, webhook["id"])[0][1].startswith("cli:")

    listed = run_cli(fleet, "list")
    assert webhook["id"] in listed.stdout
    assert secret not in listed.stdout

    lab = Device(fleet, "lab-cam", fleet.create_key(tags={"site": "lab"})["join_token"])
    try:
        release = make_release(fleet, "detector", "1.0")
        message = lab.result(release, label="cat")
        wait_until(lambda: receiver.posts(), what="the result posted")
        verify(secret, receiver.posts()[0])
    finally:
        lab.close()
    log = wait_until(
        lambda: "delivered" in (out := run_cli(fleet, "deliveries", webhook["id"]).stdout) and out,
        what="the delivery logged",
    )
    assert message.message_id in log
    assert "attempts 1" in log

    disabled = run_cli(fleet, "disable", webhook["id"])
    assert disabled.returncode == 0, disabled.stderr
    assert [a for a, _ in audit_actions(fleet, webhook["id"])] == [
        "webhook.create",
        "webhook.disable",
    ]
    assert "disabled" in run_cli(fleet, "list").stdout

    for args, says in (
        (("create", "ftp", "--url", "ftp://example.org/x"), "not ftp"),
        (("create", "erp", "--url", "https://example.org/x"), "exists"),
        (("create", "tagged", "--url", "https://example.org/x", "--tag", "lab"), "key=value"),
        (("disable", "wh-nope"), "no webhook 'wh-nope'"),
        (("deliveries", "wh-nope"), "no webhook 'wh-nope'"),
    ):
        failed = run_cli(fleet, *args)
        assert failed.returncode == 1, failed.stdout
        assert says in failed.stderr


# --- pure parts --------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event":"result"}'
    expected = hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("whsec_x", 1_700_000_000, body) == f"t=1700000000,v1={expected}"


def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    settings = SenderSettings(retry_base_s=5, retry_max_s=60)
    rng = random.Random(7)
    for attempts, nominal in ((1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (20, 60)):
        waits = [backoff_s(attempts, settings, rng) for _ in range(200)]
        assert nominal / 2 <= min(waits) and max(waits) <= nominal
        assert max(waits) - min(waits) > nominal / 4, "no jitter"


@pytest.mark.parametrize(
    ("url", "require_https", "allowed"),
    [
        ("https://example.org/hook", True, True),
        ("http://127.0.0.1:8080/hook", True, True),
        ("http://localhost/hook", True, True),
        ("http://[::1]:9000/hook", True, True),
        ("http://192.168.1.20/hook", True, False),
        ("http://192.168.1.20/hook", False, True),
        ("ftp://127.0.0.1/hook", False, False),
        ("file:///etc/passwd", False, False),
        ("https://ex\x00ample.org/hook", False, False),
        ("https://[::1/hook", False, False),
        ("//example.org/hook", False, False),
    ],
)
def test_check_url_allows_https_and_loopback_http_only(
    url: str, require_https: bool, allowed: bool
) -> None:
    if allowed:
        check_url(url, require_https=require_https)
    else:
        with pytest.raises(WebhookUrlError):
            check_url(url, require_https=require_https)


@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            "{}://{}{}".format,
            st.sampled_from(["http", "https", "ftp", "HTTPS", ""]),
            st.text(max_size=40),
            st.text(max_size=20),
        ),
    ),
    st.booleans(),
)
def test_check_url_never_crashes_it_accepts_or_says_why_not(url: str, require_https: bool) -> None:
    try:
        check_url(url, require_https=require_https)
    except WebhookUrlError as exc:
        assert url[:20] in exc.detail or "webhook URL" in exc.detail
