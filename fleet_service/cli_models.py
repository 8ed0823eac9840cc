"""``edgefleet models`` and ``edgefleet signing``, run on the control-plane host against its home.

Like the ``keys`` commands these work straight on the fleet home and database (no login): the
files go into the same artifact store the service serves from, signed with the same key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from sqlmodel import Session

from fleet_protocol.manifest import FileRole
from fleet_service import audit
from fleet_service.artifacts import (
    ReleaseFile,
    ReleaseSigner,
    SigningKeyInfo,
    constraints_from,
    create_release,
    list_releases,
    open_store,
    release_public,
)
from fleet_service.cli_keys import in_session
from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome
from fleet_service.roles import Principal
from fleet_service.schemas import ModelReleasePublic

__all__ = ["PushRequest", "list_all", "push", "rotate_signing_key", "signing_keys"]


@dataclass(frozen=True)
class PushRequest:
    """What ``edgefleet models push`` was asked to upload."""

    weights: Path
    name: str
    version: str
    runtime: str
    tokenizer: Path | None = None
    labels: Path | None = None
    config: Path | None = None
    architectures: Sequence[str] = ()
    min_ram_bytes: int = 0
    min_disk_bytes: int = 0
    expires_in_days: int = 365
    encrypt: bool = False

    def files(self) -> list[ReleaseFile]:
        roles = (
            (self.weights, FileRole.WEIGHTS),
            (self.tokenizer, FileRole.TOKENIZER),
            (self.labels, FileRole.LABELS),
            (self.config, FileRole.CONFIG),
        )
        return [ReleaseFile(path=path, role=role) for path, role in roles if path is not None]


@contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield progress


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # create_release names the missing file


def push(settings: ServiceSettings, request: PushRequest, console: Console) -> ModelReleasePublic:
    """Store, sign and record a release, showing a progress bar over the files' bytes."""
    home = FleetHome(settings.home)
    home.require_initialised()
    store = open_store(settings, home)
    signer = ReleaseSigner.open(home)
    files = request.files()
    now = datetime.now(UTC)
    constraints = constraints_from(
        request.architectures, request.min_ram_bytes, request.min_disk_bytes
    )
    total = sum(_file_size(f.path) for f in files)
    label = f"{request.name} {request.version}" + (" (sealing)" if request.encrypt else "")
    actor = Principal.cli()
    with _progress(console) as progress:
        task = progress.add_task(label, total=total)

        def work(session: Session) -> ModelReleasePublic:
            release = create_release(
                session,
                store,
                signer,
                name=request.name,
                version=request.version,
                runtime=request.runtime,
                files=files,
                constraints=constraints,
                expires_at=now + timedelta(days=request.expires_in_days),
                encrypt=request.encrypt,
                created_by=actor.name,
                progress=lambda n: progress.advance(task, n),
                now=now,
            )
            public = release_public(release)
            detail = {"name": request.name, "version": request.version, "sealed": request.encrypt}
            audit.record(session, actor, "model.create", public.id, detail=detail)
            return public

        return in_session(settings, work)


def list_all(settings: ServiceSettings, name: str | None) -> list[ModelReleasePublic]:
    """Releases, newest first."""
    return in_session(settings, lambda s: [release_public(r) for r in list_releases(s, name=name)])


def signing_keys(settings: ServiceSettings) -> list[SigningKeyInfo]:
    """The trusted signing keys, the active one marked."""
    home = FleetHome(settings.home)
    home.require_initialised()
    return ReleaseSigner.open(home).list_keys()


def rotate_signing_key(settings: ServiceSettings) -> str:
    """Make a new signing key active; returns its id."""
    home = FleetHome(settings.home)
    home.require_initialised()
    key_id = ReleaseSigner.open(home).rotate()

    def work(session: Session) -> None:
        audit.record(session, Principal.cli(), "signing.rotate", key_id)

    in_session(settings, work)
    return key_id
