"""The ``edgefleet`` command: init a fleet, run it, manage registration keys, run the demo."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet_service.config import ServiceSettings
from fleet_service.errors import ServiceError
from fleet_service.home import FleetHome

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefleet",
    help="The edgefleet control plane: PKI, broker, API and dashboard on your own machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Registration keys that let devices enroll.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="EDGEFLEET_HOME", help="Fleet home directory [./.edgefleet]"),
]


def _settings(home: Path | None, **overrides: Any) -> ServiceSettings:
    """Settings from, weakest first: what init saved in the home, EDGEFLEET_* env, options."""
    root = home or Path(os.environ.get("EDGEFLEET_HOME", ".edgefleet"))
    saved = FleetHome(root).read_saved_settings()
    values = {k: v for k, v in saved.items() if f"EDGEFLEET_{k.upper()}" not in os.environ}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["home"] = root
    try:
        return ServiceSettings(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _configure_logging(level: str) -> None:
    # key=value fields, like the agent's, so one grep or log shipper reads both sides.
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


@app.command()
def init(
    home: HomeOption = None,
    san: Annotated[
        list[str] | None,
        typer.Option(help="Extra DNS name or IP for the server certificate (repeatable)."),
    ] = None,
    advertise_host: Annotated[
        str | None, typer.Option(help="Address devices use to reach this host.")
    ] = None,
    admin: Annotated[str, typer.Option(help="Name of the first admin user.")] = "admin",
) -> None:
    """Create the fleet CA, certificates, signing key, database and first admin user."""
    from fleet_service.bootstrap import initialise_home

    settings = _settings(home, advertise_host=advertise_host)
    try:
        result = initialise_home(settings, extra_names=san or [], admin_username=admin)
    except ServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(f"fleet created in {result.home}")
    typer.echo(f"  CA fingerprint: {result.ca_fingerprint}")
    typer.echo(f"  admin login:    {result.admin_username} / {result.admin_password}")
    typer.echo("  (the password is shown only now; keep it somewhere safe)")
    typer.echo("next: `edgefleet up`, then `edgefleet keys create` to enroll a device")


@app.command()
def up(
    home: HomeOption = None,
    http_host: Annotated[str | None, typer.Option(help="API bind address.")] = None,
    http_port: Annotated[int | None, typer.Option(help="API (HTTPS) port.")] = None,
    mqtt_bind_host: Annotated[str | None, typer.Option(help="Broker bind address.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="Broker (MQTT over TLS) port.")] = None,
    log_level: Annotated[str, typer.Option(envvar="EDGEFLEET_LOG_LEVEL")] = "INFO",
) -> None:
    """Run the broker (supervised), MQTT ingestion, the HTTPS API and the dashboard."""
    from fleet_service.runner import run_fleet

    settings = _settings(
        home,
        http_host=http_host,
        http_port=http_port,
        mqtt_bind_host=mqtt_bind_host,
        mqtt_port=mqtt_port,
        log_level=log_level,
    )
    _configure_logging(settings.log_level)
    try:
        asyncio.run(run_fleet(settings))
    except ServiceError as exc:
        raise _fail(exc) from exc


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"tag {tag!r} must look like key=value", param_hint="--tag")
        parsed[key] = value
    return parsed


@keys_app.command("create")
def keys_create(
    home: HomeOption = None,
    expires: Annotated[str, typer.Option(help="Lifetime: 30m, 24h, 7d.")] = "24h",
    max_uses: Annotated[int, typer.Option(min=1, help="How many devices may enroll.")] = 1,
    tag: Annotated[
        list[str] | None, typer.Option(help="key=value applied to enrolled devices (repeatable).")
    ] = None,
) -> None:
    """Create a registration key and print its join token (shown only once)."""
    from fleet_service import cli_keys

    settings = _settings(home)
    try:
        created = cli_keys.create(settings, expires, max_uses, _parse_tags(tag))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except ServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(f"key {created.id}: {created.max_uses} use(s), expires {created.expires_at:%c %Z}")
    if created.tags:
        typer.echo("tags: " + ", ".join(f"{k}={v}" for k, v in created.tags.items()))
    typer.echo("join token (shown only now):")
    typer.echo(created.join_token)
    typer.echo(
        f"on the device: edgefleet-agent enroll {created.join_token[:16]}... --state-dir DIR"
    )


@keys_app.command("list")
def keys_list(home: HomeOption = None) -> None:
    """List registration keys and their state."""
    from fleet_service import cli_keys

    try:
        rows = cli_keys.list_all(_settings(home))
    except ServiceError as exc:
        raise _fail(exc) from exc
    if not rows:
        typer.echo("no registration keys; create one with `edgefleet keys create`")
    for row in rows:
        tags = ",".join(f"{k}={v}" for k, v in row.tags.items()) or "-"
        typer.echo(
            f"{row.id}  {row.state:<8} uses {row.uses}/{row.max_uses}  "
            f"expires {row.expires_at:%Y-%m-%d %H:%M %Z}  tags {tags}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str, home: HomeOption = None) -> None:
    """Revoke a registration key; devices already enrolled keep working."""
    from fleet_service import cli_keys

    try:
        row = cli_keys.revoke(_settings(home), key_id)
    except ServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(f"key {row.id} revoked")


@app.command()
def demo(
    home: HomeOption = None,
    devices: Annotated[int, typer.Option(min=1, max=20, help="How many agents to run.")] = 3,
) -> None:
    """Bring up a local fleet with a few real agents; Ctrl-C stops everything."""
    from fleet_service.demo import run_demo

    settings = _settings(home)
    _configure_logging("WARNING")
    try:
        run_demo(settings, devices)
    except ServiceError as exc:
        raise _fail(exc) from exc


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
