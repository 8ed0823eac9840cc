"""Helpers the benchmarks share: a real service in a temp home, enrolled devices, progress.

Each benchmark starts ``edgefleet up`` as a subprocess on free ports, enrolls simulated devices
through the real REST API (a key and CSR made here for each) and talks to the real broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet_service.bootstrap import add_replica, initialise_home
from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome
from fleet_service.pki import issue_client_cert, load_certificate, load_private_key

__all__ = [
    "Device",
    "admin_token",
    "api_base",
    "enroll_devices",
    "free_port",
    "issue_identity",
    "note",
    "progress",
    "progress_done",
    "scratch_database",
    "server_context",
    "start_replica",
    "start_service",
    "stop_process",
]


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: Path
    key: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_last_progress = [0.0]


def progress(text: str) -> None:
    """A live status line on a terminal; a line every few seconds in a log."""
    if sys.stderr.isatty():
        print(f"\r{text:<78}", end="", file=sys.stderr, flush=True)
    elif time.monotonic() - _last_progress[0] > 3:
        _last_progress[0] = time.monotonic()
        print(text, file=sys.stderr, flush=True)


def progress_done() -> None:
    if sys.stderr.isatty():
        print(file=sys.stderr)


def note(text: str) -> None:
    """A line on stderr that stays, e.g. which phase of a benchmark starts."""
    if sys.stderr.isatty():
        print(f"\r{' ' * 78}\r", end="", file=sys.stderr)
    print(text, file=sys.stderr, flush=True)


def api_base(settings: ServiceSettings) -> str:
    return f"https://127.0.0.1:{settings.http_port}/api/v1"


def server_context(settings: ServiceSettings) -> ssl.SSLContext:
    """TLS context trusting the fleet CA (for HTTPS and MQTT)."""
    return ssl.create_default_context(cafile=str(settings.home / "ca.crt"))


def start_service(
    work: Path,
    database_url: str | None,
    readers: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    replicas: Sequence[str] = (),
) -> tuple[ServiceSettings, str, Any]:
    """Init a fleet home under ``work`` and run ``edgefleet up``; returns (settings, admin
    password, process). ``readers`` are broker identities allowed to read every device topic;
    ``extra_env`` holds further ``EDGEFLEET_*`` settings for the service process; ``replicas``
    are added (``edgefleet replicas add``) before it starts, so its broker ACL grants them
    (run each with :func:`start_replica`)."""
    env = {
        "EDGEFLEET_HOME": str(work / "home"),
        "EDGEFLEET_HTTP_PORT": str(free_port()),
        "EDGEFLEET_MQTT_PORT": str(free_port()),
        "EDGEFLEET_BROKER_READERS": json.dumps(list(readers)),
        "EDGEFLEET_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["EDGEFLEET_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    settings = ServiceSettings(
        home=work / "home",
        http_port=int(env["EDGEFLEET_HTTP_PORT"]),
        mqtt_port=int(env["EDGEFLEET_MQTT_PORT"]),
        database_url=database_url,
    )
    password = initialise_home(settings).admin_password
    for name in replicas:
        add_replica(settings, name)
        settings = settings.model_copy(update={"replicas": (*settings.replicas, name)})
    log_path = work / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleet_service", "up"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _wait_healthy(settings, process, log_path)
    return settings, password, process


def start_replica(
    work: Path,
    settings: ServiceSettings,
    name: str,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[ServiceSettings, subprocess.Popen[bytes]]:
    """Run ``edgefleet up --replica NAME`` on a free HTTPS port, against the broker and
    database of the service in ``settings`` (see :func:`start_service`); returns the replica's
    settings (its own ``http_port``) and process once it is healthy. Its log is
    ``work/replica-NAME.log``."""
    replica = settings.model_copy(update={"replica": name, "http_port": free_port()})
    env = {
        "EDGEFLEET_HOME": str(settings.home),
        "EDGEFLEET_MQTT_PORT": str(settings.mqtt_port),
        "EDGEFLEET_LOG_LEVEL": "WARNING",
    }
    if settings.database_url:
        env["EDGEFLEET_DATABASE_URL"] = settings.database_url
    env.update(extra_env or {})
    log_path = work / f"replica-{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet_service",
                "up",
                "--replica",
                name,
                "--http-port",
                str(replica.http_port),
            ],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _wait_healthy(replica, process, log_path)
    return replica, process


def _wait_healthy(
    settings: ServiceSettings, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Until the API on ``settings.http_port`` says ok; exits if the process ends or times out."""
    with httpx.Client(verify=server_context(settings), timeout=5) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.get(f"{api_base(settings)}/health").json()["status"] == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    stop_process(process)
    raise SystemExit(f"the service did not start; see {log_path}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not stopped within 30 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def admin_token(client: httpx.Client, settings: ServiceSettings, password: str) -> str:
    """An operator access token for the admin user."""
    answer = client.post(
        f"{api_base(settings)}/auth/token", data={"username": "admin", "password": password}
    )
    answer.raise_for_status()
    token: str = answer.json()["access_token"]
    return token


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def enroll_devices(
    settings: ServiceSettings, password: str, count: int, work: Path
) -> list[Device]:
    """Enroll ``count`` devices through the real API, each with a key made here."""
    base = api_base(settings)
    devices = []
    with httpx.Client(verify=server_context(settings), timeout=30) as client:
        token = admin_token(client, settings, password)
        key = client.post(
            f"{base}/keys",
            json={"max_uses": count, "expires_in_s": 3600},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["key"]
        for n in range(count):
            private = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([]))
                .sign(private, hashes.SHA256())
            )
            answer = client.post(
                f"{base}/enroll",
                json={
                    "registration_key": key,
                    "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
                    "hostname": f"sim-{n}",
                },
            )
            answer.raise_for_status()
            body = answer.json()
            cert_path = work / f"{body['device_id']}.crt"
            key_path = work / f"{body['device_id']}.key"
            cert_path.write_text(body["certificate_pem"])
            key_path.write_bytes(_pkcs8(private))
            devices.append(Device(body["device_id"], cert_path, key_path))
            progress(f"enrolled {n + 1}/{count} devices")
    progress_done()
    return devices


def issue_identity(settings: ServiceSettings, name: str, work: Path) -> tuple[Path, Path]:
    """A client certificate with CN ``name`` from the fleet CA; returns (cert, key) paths."""
    home = FleetHome(settings.home)
    key, cert = issue_client_cert(
        load_private_key(home.ca_key), load_certificate(home.ca_cert), name
    )
    cert_path, key_path = work / f"{name}.crt", work / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pkcs8(key))
    return cert_path, key_path


@contextlib.contextmanager
def scratch_database(server_url: str | None) -> Iterator[str | None]:
    """A fresh PostgreSQL database on ``server_url`` for this run, dropped afterwards."""
    if server_url is None:
        yield None
        return
    plain = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = "ef_bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{plain.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
