"""``edgefleet sites``: site brokers bridged to the central broker (create, list, revoke).

Run on the control-plane host, straight against its database, like ``edgefleet integrations``:
the fleet CA signs the site's certificates here and its key never leaves this host. The running
primary's broker policy loop grants (or, after a revocation, refuses) the site's bridge within
``broker_policy_poll_s``; these commands wait for the broker's files to show it.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleet_service.cli_identity import (
    HomeOption,
    _acl_grants,
    _crl_lists,
    _fail,
    _invalid,
    _report,
    _settings,
    _wait_for_broker,
)
from fleet_service.home import FleetHome

if TYPE_CHECKING:
    from sqlmodel import Session

    from fleet_service.sites import SiteBundle

__all__ = ["sites_app"]

sites_app = typer.Typer(
    help="Site brokers: a Mosquitto per site, bridged to the central broker over one uplink.",
    no_args_is_help=True,
)


@sites_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A unique site name, e.g. warehouse-3.")],
    san: Annotated[
        list[str],
        typer.Option(
            help="Host name or IP address devices use to reach the site broker (repeatable)."
        ),
    ],
    tag: Annotated[
        str | None,
        typer.Option(help="The devices this site carries: key=value (default: site=NAME)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write the bundle here (keys 0600; default: ./site-NAME)."),
    ] = None,
    install_dir: Annotated[
        str | None,
        typer.Option(
            help="Where the bundle will live on the site host (default: the --out directory)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="The site broker's mTLS port.")] = 8883,
    bind: Annotated[
        str, typer.Option(help="The site broker's bind address (mTLS only).")
    ] = "0.0.0.0",  # noqa: S104 - devices on the site's LAN connect; there is no plaintext port
    run_as: Annotated[
        str | None,
        typer.Option(help="The user mosquitto runs as on the site host (default: mosquitto)."),
    ] = None,
    central_host: Annotated[
        str | None,
        typer.Option(
            help="The central broker's address as the site reaches it (default: advertise_host)."
        ),
    ] = None,
    central_port: Annotated[
        int | None, typer.Option(help="The central broker's port (default: mqtt_port).")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Issue a site broker bundle: certificates, CRL, mosquitto.conf with the bridge, ACL."""
    from pydantic import ValidationError

    from fleet_service.authority import CertificateAuthority
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.roles import Principal
    from fleet_service.sites import SiteCreate, create_site, fresh_crl_pem, write_site_bundle

    settings = _settings(home)
    out = out or Path(f"site-{name}")
    if out.exists() and any(out.iterdir()):
        raise _fail(f"{out} is not empty; choose a new directory for the bundle")
    try:
        body = SiteCreate.model_validate(
            {
                "name": name,
                "tag": tag or f"site={name}",
                "sans": san,
                "install_dir": install_dir or str(out.resolve()),
                "port": port,
                "bind_host": bind,
                "run_as_user": run_as or "mosquitto",
            }
        )
    except ValidationError as exc:
        raise _fail(_invalid(exc)) from exc
    authority = CertificateAuthority.load(FleetHome(settings.home))

    def work(session: Session) -> SiteBundle:
        from datetime import timedelta

        crl = fresh_crl_pem(session, authority, timedelta(days=settings.crl_lifetime_days))
        return create_site(
            session,
            body,
            Principal.cli(),
            authority,
            crl_pem=crl,
            central_host=central_host or settings.advertise_host,
            central_port=central_port or settings.mqtt_port,
            topic_prefix=settings.topic_prefix,
            cert_days=settings.integration_cert_days,
        )

    try:
        bundle = in_session(settings, work)
    except (ServiceError, ValueError) as exc:
        detail = exc.detail if isinstance(exc, ServiceError) else str(exc)
        raise _fail(detail) from exc
    for path in write_site_bundle(out, bundle):
        typer.echo(f"  wrote {path}")
    site = bundle.site
    typer.echo(f"site {site.name} ({site.identity}) created; it carries devices tagged {site.tag}")
    typer.echo(f"its bridge connects to {bundle.central}; the keys are only in {out}")
    if body.run_as_user != getpass.getuser():
        typer.echo(f"on the site host: chown -R {body.run_as_user} {body.install_dir}")
    typer.echo(f"see {out / 'README.md'} for how to run it")
    applied = _wait_for_broker(settings, _acl_grants(site.identity))
    _report(settings, applied, "grants its bridge")


@sites_app.command("list")
def list_all(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List sites, revoked ones included (keys are never shown again)."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.sites import list_sites

    try:
        rows = in_session(_settings(home), list_sites)
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    if as_json:
        typer.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        typer.echo("no sites; create one with `edgefleet sites create NAME --san HOST`")
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
        typer.echo(
            f"{row.id}  {row.name:<20} {state:<18} devices {row.tag}  "
            f"cert until {row.cert_not_after:%Y-%m-%d}"
        )


@sites_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The site's name.")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
    home: HomeOption = None,
) -> None:
    """Revoke a site: its bridge certificate goes on the CRL, its grants leave the central ACL
    and its uplink is cut."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.roles import Principal
    from fleet_service.sites import revoke_site

    settings = _settings(home)
    if reason is not None and not 1 <= len(reason) <= 200:
        raise _fail("--reason must be 1-200 characters")
    try:
        site, serials = in_session(
            settings, lambda s: revoke_site(s, name, Principal.cli(), reason=reason)
        )
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    typer.echo(f"site {site.name} ({site.identity}) revoked")
    applied = _wait_for_broker(settings, _crl_lists(serials))
    _report(settings, applied, "refuses its bridge certificate and has dropped its uplink")
