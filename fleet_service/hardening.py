"""Startup refusals: ``edgefleet up`` will not serve with exposed keys or known secrets.

Checked here, once the home is known: every key or secret file in the fleet home is 0600 and
owned by the user the service runs as, the home itself is not writable by others, the HMAC
secrets are long and not a well-known value, and S3 credentials are not MinIO's defaults.
Settings that are insecure on their face (plain HTTP off loopback, a "*" CORS origin, an OIDC
issuer over plain HTTP) are refused earlier, when the settings are built (config.py).

Every problem found is reported at once, each naming the file or setting and the fix, so an
owner fixes them in one pass rather than one restart each.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from fleet_service.config import ServiceSettings
from fleet_service.errors import ServiceError
from fleet_service.home import FleetHome

__all__ = [
    "DEFAULT_S3_SECRETS",
    "KNOWN_WEAK_SECRETS",
    "MIN_SECRET_BYTES",
    "InsecureSetupError",
    "require_safe_startup",
    "startup_problems",
]

# An HMAC key shorter than its hash output (SHA-256) is weaker than the hash; what
# `edgefleet init` writes is 32 random bytes.
MIN_SECRET_BYTES: Final = 32
# Values people paste into secret files and environment variables from examples and tutorials.
KNOWN_WEAK_SECRETS: Final = frozenset(
    {
        "secret",
        "changeme",
        "change-me",
        "change_me",
        "changeit",
        "password",
        "admin",
        "default",
        "edgefleet",
        "test",
        "minioadmin",
        "your-secret-key",
        "supersecret",
        "jwt-secret",
        "secretkey",
    }
)
# MinIO's built-in root credentials (current and older releases) and AWS's documentation keys.
DEFAULT_S3_SECRETS: Final = frozenset(
    {"minioadmin", "minio123", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
)
_DEFAULT_S3_ACCESS_KEYS: Final = frozenset({"minioadmin", "minio", "AKIAIOSFODNN7EXAMPLE"})
# A file of random bytes has many distinct ones; 32 bytes of one or two repeated values
# (zeros, "aaaa...") is a placeholder, not a key.
_MIN_DISTINCT_BYTES: Final = 8


class InsecureSetupError(ServiceError):
    """The fleet home or the settings are not safe to serve with; the detail lists each fix."""

    status = 500
    title = "insecure setup"

    def __init__(self, problems: list[str]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"edgefleet will not start until these are fixed:\n{lines}")
        self.problems = problems


def require_safe_startup(settings: ServiceSettings, home: FleetHome) -> None:
    """Raise :class:`InsecureSetupError` listing every problem :func:`startup_problems` finds."""
    problems = startup_problems(settings, home)
    if problems:
        raise InsecureSetupError(problems)


def startup_problems(settings: ServiceSettings, home: FleetHome) -> list[str]:
    """What makes this home and these settings unsafe to serve with, one fix per line."""
    problems = _home_problems(home.root)
    for path in _private_files(home):
        if (problem := _file_problem(path)) is not None:
            problems.append(problem)
    for path in _hmac_secret_files(home):
        if (problem := _secret_file_problem(path)) is not None:
            problems.append(problem)
    return [*problems, *_settings_secret_problems(settings)]


def _private_files(home: FleetHome) -> list[Path]:
    """Every key and secret file in the home: the known ones and any other *.key/*.secret."""
    candidates: set[Path] = set(home.secret_files)
    for directory in (home.root, home.root / "signing"):
        if directory.is_dir():
            candidates.update(directory.glob("*.key"))
            candidates.update(directory.glob("*.secret"))
    return sorted(path for path in candidates if path.exists())


def _hmac_secret_files(home: FleetHome) -> Iterable[Path]:
    # The two HMAC keys: operator tokens, and device download URLs (fleet_service.artifacts).
    for path in (home.jwt_secret, home.root / "artifact-url.secret"):
        if path.exists():
            yield path


def _service_user() -> tuple[int, str]:
    uid = os.geteuid()
    try:
        import pwd  # POSIX only; the service runs on Linux and macOS

        return uid, pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return uid, str(uid)


def _home_problems(root: Path) -> list[str]:
    if not root.is_dir() or not hasattr(os, "geteuid"):
        return []
    info = root.stat()
    problems = []
    uid, user = _service_user()
    if info.st_uid != uid:
        problems.append(
            f"the fleet home {root} belongs to uid {info.st_uid}, not to {user} (uid {uid}) who "
            f"runs the service: run `chown -R {user} {root}` or run edgefleet as its owner"
        )
    if info.st_mode & 0o022:
        problems.append(
            f"the fleet home {root} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}), who could replace its keys: run `chmod 700 {root}`"
        )
    return problems


def _file_problem(path: Path) -> str | None:
    if not hasattr(os, "geteuid"):
        return None
    info = path.stat()
    uid, user = _service_user()
    faults, fixes = [], []
    if info.st_mode & 0o077:
        faults.append(f"readable by other users (mode {stat.S_IMODE(info.st_mode):04o})")
        fixes.append(f"`chmod 600 {path}`")
    if info.st_uid != uid:
        faults.append(f"owned by uid {info.st_uid}, not by {user} (uid {uid}) who runs the service")
        fixes.append(f"`chown {user} {path}`")
    if not faults:
        return None
    return f"key file {path} is {' and '.join(faults)}: run {' and '.join(fixes)}"


def _weakness(secret: bytes) -> str | None:
    """Why ``secret`` is no secret, or None."""
    if secret.strip().decode(errors="replace").lower() in KNOWN_WEAK_SECRETS:
        return "a well-known default value"
    if len(secret) < MIN_SECRET_BYTES:
        return f"only {len(secret)} bytes long (at least {MIN_SECRET_BYTES} random bytes needed)"
    if len(set(secret)) < _MIN_DISTINCT_BYTES:
        return "a placeholder (almost every byte is the same), not a random key"
    return None


def _secret_file_problem(path: Path) -> str | None:
    weakness = _weakness(path.read_bytes())
    if weakness is None:
        return None
    return (
        f"secret file {path} is {weakness}: stop the service, run "
        f"`(umask 077; head -c 32 /dev/urandom > {path})` and start it again "
        "(operators log in again; download URLs already handed out stop working)"
    )


def _settings_secret_problems(settings: ServiceSettings) -> list[str]:
    problems = []
    # An HMAC secret given as a setting (when one exists) is held to the file's standard.
    for name in ("jwt_secret",):
        value = getattr(settings, name, None)
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        weakness = _weakness(raw.encode())
        if weakness is not None:
            problems.append(
                f"setting {name} (EDGEFLEET_{name.upper()}) is {weakness}: set it to the output "
                "of `openssl rand -hex 32`"
            )
    if settings.artifact_store == "s3":
        secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else ""
        if secret in DEFAULT_S3_SECRETS or settings.s3_access_key in _DEFAULT_S3_ACCESS_KEYS:
            problems.append(
                "settings s3_access_key/s3_secret_key are MinIO's (or AWS's example) default "
                "credentials, which anyone can look up: create a user for edgefleet on the S3 "
                "server (`mc admin user add`) with access to its bucket, or change MinIO's "
                "MINIO_ROOT_USER/MINIO_ROOT_PASSWORD, and set EDGEFLEET_S3_ACCESS_KEY and "
                "EDGEFLEET_S3_SECRET_KEY to them"
            )
    return problems
