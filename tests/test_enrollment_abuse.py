"""Registration keys under attack, against the real service on SQLite and PostgreSQL: guessing
is rate-limited per address, and enrollments racing for a key's last use make exactly as many
devices as the key allows."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from fleet_protocol import EnrollRequest
from fleet_service.authority import CertificateAuthority
from fleet_service.db import session_scope
from fleet_service.enrollment import EnrollmentTarget, enroll_device
from fleet_service.errors import RegistrationKeyError
from tests.fixtures.fleet import Fleet, start_fleet
from tests.test_enrollment import make_csr

GUESSES_PER_MINUTE = 5


def client_from(fleet: Fleet, address: str) -> httpx.Client:
    """An HTTPS client whose connections come from ``address`` (any of 127.0.0.0/8)."""
    verify = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    transport = httpx.HTTPTransport(local_address=address, verify=verify)
    return httpx.Client(base_url=fleet.url, transport=transport, timeout=30)


def enroll_body(key: str) -> dict[str, str]:
    return {"registration_key": key, "csr_pem": make_csr(), "hostname": "racer"}


def devices_of(fleet: Fleet, key_id: str) -> int:
    with fleet.engine.connect() as conn:
        count: int = conn.execute(
            text("SELECT count(*) FROM device WHERE registration_key_id = :k"), {"k": key_id}
        ).scalar_one()
    return count


def uses_of(fleet: Fleet, key_id: str) -> int:
    with fleet.engine.connect() as conn:
        uses: int = conn.execute(
            text("SELECT uses FROM registration_key WHERE id = :k"), {"k": key_id}
        ).scalar_one()
    return uses


@pytest.fixture
def limited_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet allowing few enrollment attempts per address (the limit is in memory, so one
    database is enough)."""
    fleet = start_fleet(
        tmp_path,
        None,
        extra_env={"EDGEFLEET_ENROLL_RATE_PER_ADDRESS": f"{GUESSES_PER_MINUTE}/minute"},
    )
    yield fleet
    fleet.close()


@pytest.fixture
def racing_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    """A fleet on SQLite or PostgreSQL whose rate limit stays out of the races."""
    fleet = start_fleet(
        tmp_path, database_url, extra_env={"EDGEFLEET_ENROLL_RATE_PER_ADDRESS": "1000/minute"}
    )
    yield fleet
    fleet.close()


def test_guessing_registration_keys_is_cut_off_per_address(limited_fleet: Fleet) -> None:
    fleet = limited_fleet
    key = fleet.create_key(max_uses=5)
    with client_from(fleet, "127.0.0.1") as attacker:
        guesses = [
            attacker.post("/api/v1/enroll", json=enroll_body(f"efk_guess{n:04d}xxxxxxxx"))
            for n in range(GUESSES_PER_MINUTE + 3)
        ]
        # Once over the limit even the right key waits: a 429 says nothing about the key.
        right_key_from_attacker = attacker.post("/api/v1/enroll", json=enroll_body(key["key"]))

    assert [g.status_code for g in guesses[:GUESSES_PER_MINUTE]] == [401] * GUESSES_PER_MINUTE
    for limited in [*guesses[GUESSES_PER_MINUTE:], right_key_from_attacker]:
        assert limited.status_code == 429
        assert limited.headers["content-type"] == "application/problem+json"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert "enrollment attempts from 127.0.0.1" in limited.json()["detail"]
        assert f"{GUESSES_PER_MINUTE} per 1 minute" in limited.json()["detail"]
    assert uses_of(fleet, key["id"]) == 0, "a refused attempt spends nothing"

    # A device elsewhere enrolls as usual, and its own mistakes are its own.
    with client_from(fleet, "127.0.0.2") as device:
        typo = device.post("/api/v1/enroll", json=enroll_body("efk_typo-xxxxxxxxxxxx"))
        enrolled = device.post("/api/v1/enroll", json=enroll_body(key["key"]))
    assert typo.status_code == 401
    assert enrolled.status_code == 200, enrolled.text
    assert devices_of(fleet, key["id"]) == 1


def race(fleet: Fleet, key: str, racers: int) -> list[httpx.Response]:
    """``racers`` enrollments with ``key``, released together from one barrier."""
    bodies = [enroll_body(key) for _ in range(racers)]  # CSRs made before the start
    clients = [client_from(fleet, "127.0.0.1") for _ in range(racers)]
    for client in clients:  # connected and TLS-handshaken before the start
        assert client.get("/api/v1/health").status_code == 200
    start = threading.Barrier(racers)

    def run(index: int) -> httpx.Response:
        start.wait()
        return clients[index].post("/api/v1/enroll", json=bodies[index])

    try:
        with ThreadPoolExecutor(racers) as pool:
            return list(pool.map(run, range(racers)))
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize(("max_uses", "racers"), [(1, 2), (1, 8), (3, 10)])
def test_enrollments_racing_for_the_last_uses_make_exactly_that_many_devices(
    racing_fleet: Fleet, max_uses: int, racers: int
) -> None:
    fleet = racing_fleet
    key = fleet.create_key(max_uses=max_uses)

    answers = race(fleet, key["key"], racers)

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * max_uses + [403] * (racers - max_uses), [a.text for a in answers]
    for refused in (a for a in answers if a.status_code == 403):
        assert f"registration key {key['id']} is used-up" in refused.json()["detail"]
    device_ids = {a.json()["device_id"] for a in answers if a.status_code == 200}
    assert len(device_ids) == max_uses
    assert devices_of(fleet, key["id"]) == max_uses
    assert uses_of(fleet, key["id"]) == max_uses


def test_many_transactions_spending_one_key_at_once_spend_it_once(racing_fleet: Fleet) -> None:
    """The same race one level down, without HTTP in the way: 16 threads, each in its own
    database transaction, call enroll_device at the same moment for a key's last use."""
    fleet = racing_fleet
    key = fleet.create_key(max_uses=1)
    authority = CertificateAuthority.load(fleet.home)
    target = EnrollmentTarget(mqtt_host="127.0.0.1", mqtt_port=fleet.mqtt_port, topic_prefix="t")
    requests = [EnrollRequest.model_validate(enroll_body(key["key"])) for _ in range(16)]
    start = threading.Barrier(len(requests))

    def spend(request: EnrollRequest) -> str:
        start.wait()
        try:
            with session_scope(fleet.engine) as session:
                return enroll_device(session, request, authority, target).device_id
        except RegistrationKeyError as exc:
            return f"refused: {exc.detail}"

    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes: list[Any] = list(pool.map(spend, requests))

    enrolled = [o for o in outcomes if not o.startswith("refused")]
    assert len(enrolled) == 1, outcomes
    assert all("used-up" in o for o in outcomes if o.startswith("refused"))
    assert devices_of(fleet, key["id"]) == 1
    assert uses_of(fleet, key["id"]) == 1
