"""``edgefleet devices revoke|decommission`` and ``edgefleet integrations``.

Run on the control-plane host, straight against its database, next to a running service. The
running primary's broker policy loop notices the change within ``broker_policy_poll_s``,
reloads the broker and drops sessions; these commands wait for the broker's files (the CRL,
the ACL in the fleet home) to show it and say whether they did. Each action is audited as the
local admin (``Principal.cli()``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome

if TYPE_CHECKING:
    from pydantic import ValidationError
    from sqlmodel import Session

    from fleet_service.integrations import IntegrationPublic

__all__ = ["integrations_app", "register_device_commands"]

integrations_app = typer.Typer(
    help="Integrations: client certificates for third parties that read device data over MQTT.",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="EDGEFLEET_HOME", help="Fleet home directory [./.edgefleet]"),
]


def _settings(home: Path | None) -> ServiceSettings:
    # As every `edgefleet` command builds them: what init saved, then EDGEFLEET_* variables.
    root = home or Path(os.environ.get("EDGEFLEET_HOME", ".edgefleet"))
    saved = FleetHome(root).read_saved_settings()
    values = {k: v for k, v in saved.items() if f"EDGEFLEET_{k.upper()}" not in os.environ}
    values["home"] = root
    try:
        return ServiceSettings(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _invalid(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()
    )


def _wait_for_broker(settings: ServiceSettings, applied: Callable[[FleetHome], bool]) -> bool:
    """Poll the broker's files until ``applied`` says the running primary wrote the change."""
    home = FleetHome(settings.home)
    deadline = (
        time.monotonic() + settings.broker_policy_poll_s + settings.revocation_apply_timeout_s
    )
    while time.monotonic() < deadline:
        try:
            if applied(home):
                return True
        except (OSError, ValueError):
            pass  # a file not there yet, or a service that never ran
        time.sleep(0.2)
    return False


def _crl_lists(serials: list[str]) -> Callable[[FleetHome], bool]:
    from fleet_service.pki import load_crl

    wanted = {int(serial, 16) for serial in serials}

    def check(home: FleetHome) -> bool:
        crl = load_crl(home.broker_dir / "crl.pem")
        return wanted <= {entry.serial_number for entry in crl}

    return check


def _acl_grants(identity: str) -> Callable[[FleetHome], bool]:
    """The broker's ACL has a ``user`` block for ``identity`` (its grants are written)."""
    user_line = f"user {identity}\n"

    def check(home: FleetHome) -> bool:
        return user_line in (home.broker_dir / "acl").read_text(encoding="utf-8")

    return check


def _report(settings: ServiceSettings, applied: bool, what: str) -> None:
    if applied:
        typer.echo(f"the broker {what} now")
    else:
        typer.echo(
            f"the broker has not picked this up yet (is `edgefleet up` running for "
            f"{settings.home}?); it {what} once the service runs"
        )


def _revoke(device_id: str, reason: str | None, home: Path | None, *, decommission: bool) -> None:
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.revocation import revoke_device
    from fleet_service.roles import Principal
    from fleet_service.tables import IssuedCertificate

    settings = _settings(home)
    if reason is not None and not 1 <= len(reason) <= 200:
        raise _fail("--reason must be 1-200 characters")

    def work(session: Session) -> tuple[str | None, list[str]]:
        from sqlmodel import col, select

        device = revoke_device(
            session, device_id, Principal.cli(), reason=reason, decommission=decommission
        )
        session.flush()
        serials = session.exec(
            select(IssuedCertificate.serial).where(
                col(IssuedCertificate.identity) == device_id,
                col(IssuedCertificate.kind) == "device",
                col(IssuedCertificate.revoked_at).is_not(None),
            )
        ).all()
        return (device.revoked_at.isoformat() if device.revoked_at else None, list(serials))

    try:
        revoked_at, serials = in_session(settings, work)
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    verb = "decommissioned" if decommission else "revoked"
    typer.echo(f"device {device_id} {verb} (revoked at {revoked_at}); its history is kept")
    applied = _wait_for_broker(settings, _crl_lists(serials))
    _report(settings, applied, "refuses its certificates and has dropped its session")


def register_device_commands(devices: typer.Typer) -> None:
    """Add ``revoke`` and ``decommission`` to the ``edgefleet devices`` group."""

    @devices.command("revoke")
    def revoke(
        device_id: Annotated[str, typer.Argument(help="The device id, e.g. dev-0123456789ab.")],
        reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
        home: HomeOption = None,
    ) -> None:
        """Revoke a device: CRL, broker reload, session dropped, token refused; history kept."""
        _revoke(device_id, reason, home, decommission=False)

    @devices.command("decommission")
    def decommission(
        device_id: Annotated[str, typer.Argument(help="The device id.")],
        home: HomeOption = None,
    ) -> None:
        """Revoke a device and clear its retained topics (status, desired, reported)."""
        _revoke(device_id, None, home, decommission=True)


def _parse_read(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@integrations_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A unique name, e.g. erp-reader.")],
    read: Annotated[
        str, typer.Option(help="What it may read, comma-separated: results,telemetry,status.")
    ],
    tag: Annotated[
        str | None, typer.Option(help="Only devices with this key=value tag (now or later).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write the bundle here (key 0600) instead of printing it as JSON."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Issue a client certificate bundle that reads the granted topics and nothing else."""
    from pydantic import ValidationError

    from fleet_service.authority import CertificateAuthority
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.integrations import IntegrationCreate, create_integration, write_bundle
    from fleet_service.roles import Principal

    settings = _settings(home)
    try:
        body = IntegrationCreate.model_validate(
            {"name": name, "read": _parse_read(read), "tag": tag}
        )
    except ValidationError as exc:
        raise _fail(_invalid(exc)) from exc
    if out is not None and out.exists() and any(out.iterdir()):
        raise _fail(f"{out} is not empty; choose a new directory for the bundle")
    authority = CertificateAuthority.load(FleetHome(settings.home))
    try:
        created = in_session(
            settings,
            lambda s: create_integration(
                s,
                body,
                Principal.cli(),
                authority,
                broker_host=settings.advertise_host,
                broker_port=settings.mqtt_port,
                topic_prefix=settings.topic_prefix,
                cert_days=settings.integration_cert_days,
            ),
        )
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    integration = created.integration
    if out is None:
        typer.echo(created.model_dump_json(indent=2))
    else:
        for path in write_bundle(out, created):
            typer.echo(f"  wrote {path}")
        typer.echo(f"integration {integration.id} ({integration.identity}) created")
        typer.echo(f"the key is only in {out / 'client.key'}; edgefleet does not keep it")
        typer.echo(f"try: (cd {out} && {created.bundle.mosquitto_sub})")
    applied = _wait_for_broker(settings, _acl_grants(integration.identity))
    if out is not None:
        _report(settings, applied, "grants it")


@integrations_app.command("list")
def list_all(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List integrations, revoked ones included (keys are never shown again)."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.integrations import list_integrations

    try:
        rows = in_session(_settings(home), list_integrations)
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    if as_json:
        typer.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        typer.echo(
            "no integrations; create one with `edgefleet integrations create NAME --read ...`"
        )
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
        typer.echo(
            f"{row.id}  {row.name:<20} {state:<18} read {','.join(row.read)}  "
            f"devices {row.tag or '*'}  cert until {row.cert_not_after:%Y-%m-%d}"
        )


@integrations_app.command("revoke")
def revoke(
    integration: Annotated[str, typer.Argument(help="The integration's id or name.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    home: HomeOption = None,
) -> None:
    """Revoke an integration: CRL, grants removed from the ACL, its connection dropped."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.integrations import revoke_integration
    from fleet_service.roles import Principal
    from fleet_service.tables import Integration

    settings = _settings(home)
    if reason is not None and not 1 <= len(reason) <= 200:
        raise _fail("--reason must be 1-200 characters")

    def work(session: Session) -> tuple[IntegrationPublic, str]:
        public = revoke_integration(session, integration, Principal.cli(), reason=reason)
        row = session.get(Integration, public.id)
        assert row is not None  # just revoked
        return public, row.cert_serial

    try:
        row, serial = in_session(settings, work)
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    typer.echo(f"integration {row.id} ({row.name}) revoked")
    applied = _wait_for_broker(settings, _crl_lists([serial]))
    _report(settings, applied, "refuses its certificate and has dropped its session")
