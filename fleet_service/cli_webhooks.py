"""``edgefleet webhooks``: create, list, disable webhooks and read their delivery log.

Run on the control-plane host, straight against its database, next to a running service: the
service's ingest writer sees a new or disabled webhook with the next stored result. Each create
and disable is audited as the local admin (``Principal.cli()``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = ["app"]

# webhooks.MAX_DELIVERIES; the database modules are imported only when a command runs, so
# every other `edgefleet` command starts as fast as before.
_MAX_DELIVERIES = 1000

app = typer.Typer(
    help="Webhooks: post inference results, signed, to HTTP endpoints.", no_args_is_help=True
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


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A unique name, e.g. erp-sync.")],
    url: Annotated[str, typer.Option(help="Where results are posted (https://...).")],
    model: Annotated[
        list[str] | None, typer.Option(help="Only results of this model (repeatable).")
    ] = None,
    tag: Annotated[
        str | None, typer.Option(help="Only results of devices with this key=value tag.")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Create a webhook and print its signing secret (shown only once)."""
    from pydantic import ValidationError

    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.roles import Principal
    from fleet_service.webhooks import WebhookCreate, create_webhook

    settings = _settings(home)
    try:
        body = WebhookCreate(name=name, url=url, models=model or [], tag=tag)
    except ValidationError as exc:
        raise _fail(_invalid(exc)) from exc
    try:
        created = in_session(
            settings,
            lambda s: create_webhook(
                s, body, by=Principal.cli(), require_https=settings.webhook_require_https
            ),
        )
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    hook = created.webhook
    typer.echo(f"webhook {hook.id} ({hook.name}) posts results to {hook.url}")
    typer.echo(f"  models: {', '.join(hook.models) or 'all'}   devices: {hook.tag or 'all'}")
    typer.echo("signing secret (shown only now; verify X-Edgefleet-Signature with it):")
    typer.echo(created.secret)


@app.command("list")
def list_all(home: HomeOption = None) -> None:
    """List webhooks, enabled and disabled."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.webhooks import list_webhooks

    try:
        rows = in_session(_settings(home), list_webhooks)
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    if not rows:
        typer.echo("no webhooks; create one with `edgefleet webhooks create NAME --url URL`")
    for row in rows:
        state = "enabled" if row.enabled else "disabled"
        typer.echo(
            f"{row.id}  {state:<8} {row.name:<20} {row.url}  "
            f"models {','.join(row.models) or '*'}  tag {row.tag or '*'}"
        )


@app.command("disable")
def disable(webhook_id: str, home: HomeOption = None) -> None:
    """Stop posting to a webhook; its pending deliveries are cancelled, the log kept."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.roles import Principal
    from fleet_service.webhooks import disable_webhook

    try:
        row = in_session(
            _settings(home), lambda s: disable_webhook(s, webhook_id, by=Principal.cli())
        )
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    typer.echo(f"webhook {row.id} ({row.name}) disabled")


@app.command("deliveries")
def deliveries(
    webhook_id: str,
    limit: Annotated[int, typer.Option(min=1, max=_MAX_DELIVERIES)] = 20,
    home: HomeOption = None,
) -> None:
    """The newest deliveries of a webhook: state, attempts, last status and error."""
    from fleet_service.cli_keys import in_session
    from fleet_service.errors import ServiceError
    from fleet_service.webhooks import list_deliveries

    try:
        log = in_session(_settings(home), lambda s: list_deliveries(s, webhook_id, limit))
    except ServiceError as exc:
        raise _fail(exc.detail) from exc
    if not log.deliveries:
        typer.echo("no deliveries yet")
    for d in log.deliveries:
        status = d.last_status if d.last_status is not None else "-"
        line = f"{d.id}  {d.state:<9} attempts {d.attempts}  status {status}  {d.message_id}"
        if d.state == "pending" and d.next_attempt_at is not None:
            line += f"  next {d.next_attempt_at:%H:%M:%S}"
        if d.last_error:
            line += f"  error: {d.last_error}"
        typer.echo(line)
