"""``edgefleet users``, ``edgefleet tokens`` and ``edgefleet audit-log``: access management run
on the control-plane host, straight against its database, next to a running service.

Whoever runs these can read the CA key anyway, so they act as an admin; each change is in the
audit log as ``cli:<login name>``, in the transaction of the change.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleet_service.config import ServiceSettings
from fleet_service.errors import ServiceError

if TYPE_CHECKING:
    from sqlmodel import Session

__all__ = ["register"]

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="EDGEFLEET_HOME", help="Fleet home directory [./.edgefleet]"),
]
RoleArgument = Annotated[str, typer.Argument(help="admin, operator or viewer.")]
SettingsLoader = Callable[[Path | None], ServiceSettings]


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _role(text: str) -> str:
    from fleet_service.roles import Role

    try:
        return Role(text).value
    except ValueError as exc:
        raise typer.BadParameter(
            f"unknown role {text!r}: use admin, operator or viewer", param_hint="ROLE"
        ) from exc


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M %Z}" if value else "never"


def register(app: typer.Typer, load_settings: SettingsLoader) -> None:
    """Add the ``users`` and ``tokens`` groups and the ``audit-log`` command to ``app``."""
    users_app = typer.Typer(help="Operator accounts and their roles.", no_args_is_help=True)
    tokens_app = typer.Typer(help="API tokens for automation.", no_args_is_help=True)
    app.add_typer(users_app, name="users")
    app.add_typer(tokens_app, name="tokens")
    _user_commands(users_app, load_settings)
    _token_commands(tokens_app, load_settings)
    app.command("audit-log")(_audit_log_command(load_settings))


def _update(settings: ServiceSettings, username: str, **changes: object) -> list[str]:
    from fleet_service.audit import record
    from fleet_service.cli_keys import in_session
    from fleet_service.roles import Principal
    from fleet_service.users import UserUpdate, update_user

    body = UserUpdate.model_validate(changes)

    def work(session: Session) -> list[str]:
        user, changed = update_user(session, username, body)
        detail: dict[str, object] = {"changed": changed}
        if "role" in changed:
            detail["role"] = user.role
        record(session, Principal.cli(), "user.update", username, detail=detail)
        return changed

    return in_session(settings, work)


def _user_commands(users_app: typer.Typer, load_settings: SettingsLoader) -> None:
    @users_app.command("add")
    def add(
        username: str,
        role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "viewer",
        home: HomeOption = None,
        ask_password: Annotated[
            bool,
            typer.Option("--ask-password", help="Type the password instead of generating one."),
        ] = False,
    ) -> None:
        """Create a user; the generated password is shown only now."""
        from pydantic import ValidationError

        from fleet_service.audit import record
        from fleet_service.cli_keys import in_session
        from fleet_service.roles import Principal
        from fleet_service.users import UserCreate, add_user

        password = (
            typer.prompt("password", hide_input=True, confirmation_prompt=True)
            if ask_password
            else None
        )
        try:
            body = UserCreate(username=username, role=_role(role), password=password)
        except ValidationError as exc:
            raise typer.BadParameter(str(exc.errors()[0]["msg"])) from exc

        def work(session: Session) -> str:
            created = add_user(session, body)
            detail = {"role": body.role.value, "password": "given" if password else "generated"}
            record(session, Principal.cli(), "user.create", username, detail=detail)
            return created.password

        try:
            shown = in_session(load_settings(home), work)
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"user {username} ({body.role.value}) created")
        if not password:
            typer.echo(f"password (shown only now): {shown}")

    @users_app.command("list")
    def list_(home: HomeOption = None) -> None:
        """List users with role, last login and state."""
        from fleet_service.cli_keys import in_session
        from fleet_service.users import list_users

        try:
            rows = in_session(load_settings(home), list_users)
        except ServiceError as exc:
            raise _fail(exc) from exc
        for user in rows:
            state = "disabled" if user.disabled else "enabled"
            typer.echo(
                f"{user.username:<24} {user.role.value:<8} {state:<8} "
                f"last login {_when(user.last_login_at)}"
            )

    @users_app.command("set-role")
    def set_role(username: str, role: RoleArgument, home: HomeOption = None) -> None:
        """Change a user's role; it applies to their next request."""
        try:
            _update(load_settings(home), username, role=_role(role))
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"{username} is now {_role(role)}")

    @users_app.command("disable")
    def disable(username: str, home: HomeOption = None) -> None:
        """Stop a user from logging in; their sessions end at once."""
        try:
            _update(load_settings(home), username, disabled=True)
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"{username} is disabled and logged out")

    @users_app.command("enable")
    def enable(username: str, home: HomeOption = None) -> None:
        """Let a disabled user log in again."""
        try:
            _update(load_settings(home), username, disabled=False)
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"{username} is enabled")

    @users_app.command("reset-password")
    def reset_password(username: str, home: HomeOption = None) -> None:
        """Give a user a new generated password (shown only now); their sessions end."""
        from fleet_service.auth import generate_password

        password = generate_password()
        try:
            _update(load_settings(home), username, password=password)
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"new password for {username} (shown only now): {password}")


def _token_commands(tokens_app: typer.Typer, load_settings: SettingsLoader) -> None:
    @tokens_app.command("create")
    def create(
        name: str,
        role: Annotated[str, typer.Option(help="admin, operator or viewer.")],
        home: HomeOption = None,
        tag: Annotated[
            str | None, typer.Option(help="Limit the token to devices with this key=value.")
        ] = None,
        expires: Annotated[str, typer.Option(help="Lifetime: 12h, 30d, 90d.")] = "90d",
        secret_file: Annotated[
            Path | None,
            typer.Option(help="Write the secret to this file (mode 0600) instead of printing it."),
        ] = None,
    ) -> None:
        """Create an API token; its secret is shown only now."""
        from pydantic import ValidationError

        from fleet_service.api_tokens import ApiTokenCreate, create_token
        from fleet_service.audit import record
        from fleet_service.cli_keys import in_session
        from fleet_service.files import replace_atomically
        from fleet_service.roles import Principal

        try:
            body = ApiTokenCreate(name=name, role=_role(role), tag=tag, expires_in=expires)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise typer.BadParameter(f"{where}: {first['msg']}") from exc
        settings = load_settings(home)
        principal = Principal.cli()

        def work(session: Session) -> tuple[str, str, datetime]:
            created = create_token(
                session, body, created_by=principal.name, max_ttl_s=settings.api_token_max_ttl_s
            )
            token = created.token
            detail = {"name": token.name, "role": token.role.value, "tag": token.tag}
            record(session, principal, "token.create", token.id, detail=detail)
            return token.id, created.secret, token.expires_at

        try:
            token_id, secret, expires_at = in_session(settings, work)
        except ServiceError as exc:
            raise _fail(exc) from exc
        scope = f", devices tagged {tag}" if tag else ""
        typer.echo(
            f"token {token_id} ({name}, {body.role.value}{scope}), expires {_when(expires_at)}"
        )
        if secret_file is not None:
            # For a scraper's credentials_file: written owner-only, never on the terminal.
            replace_atomically(secret_file, secret.encode() + b"\n", 0o600)
            typer.echo(f"secret written to {secret_file} (mode 0600)")
            return
        typer.echo("secret (shown only now; send it as Authorization: Bearer <secret>):")
        typer.echo(secret)

    @tokens_app.command("list")
    def list_(home: HomeOption = None) -> None:
        """List API tokens with role, tag, state and last use (never the secrets)."""
        from fleet_service.api_tokens import list_tokens
        from fleet_service.cli_keys import in_session

        try:
            rows = in_session(load_settings(home), list_tokens)
        except ServiceError as exc:
            raise _fail(exc) from exc
        if not rows:
            typer.echo("no API tokens; create one with `edgefleet tokens create NAME --role ...`")
        for t in rows:
            typer.echo(
                f"{t.id}  {t.name:<20} {t.role.value:<8} {t.state:<8} tag {t.tag or '-'}  "
                f"expires {_when(t.expires_at)}  last used {_when(t.last_used_at)}"
            )

    @tokens_app.command("revoke")
    def revoke(token_id: str, home: HomeOption = None) -> None:
        """Revoke an API token: its next request is refused."""
        from fleet_service.api_tokens import revoke_token
        from fleet_service.audit import record
        from fleet_service.cli_keys import in_session
        from fleet_service.roles import Principal

        def work(session: Session) -> str:
            token = revoke_token(session, token_id)
            record(session, Principal.cli(), "token.revoke", token_id, detail={"name": token.name})
            return token.name

        try:
            name = in_session(load_settings(home), work)
        except ServiceError as exc:
            raise _fail(exc) from exc
        typer.echo(f"token {token_id} ({name}) revoked")


def _audit_log_command(load_settings: SettingsLoader) -> Callable[..., None]:
    def audit_log(
        home: HomeOption = None,
        actor: Annotated[
            str | None, typer.Option(help="Only this actor (alice, cli:root).")
        ] = None,
        action: Annotated[
            str | None, typer.Option(help="Only this action; 'user.*' for a prefix.")
        ] = None,
        target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
        outcome: Annotated[str | None, typer.Option(help="success, denied or failed.")] = None,
        since: Annotated[
            datetime | None, typer.Option(help="From this time (ISO 8601, UTC if no zone).")
        ] = None,
        until: Annotated[datetime | None, typer.Option(help="Up to this time.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    ) -> None:
        """Show the audit log, newest first: who did what, to what, from where, with what
        outcome."""
        from datetime import UTC

        from fleet_service.audit_log import AuditFilter, list_events
        from fleet_service.cli_keys import in_session

        if outcome is not None and outcome not in ("success", "denied", "failed"):
            raise typer.BadParameter("use success, denied or failed", param_hint="--outcome")
        wanted = AuditFilter(
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            since=since.replace(tzinfo=since.tzinfo or UTC) if since else None,
            until=until.replace(tzinfo=until.tzinfo or UTC) if until else None,
            limit=limit,
        )
        try:
            rows = in_session(load_settings(home), lambda s: list_events(s, wanted))
        except ServiceError as exc:
            raise _fail(exc) from exc
        for event in rows:
            if as_json:
                typer.echo(event.model_dump_json())
                continue
            typer.echo(
                f"{event.at:%Y-%m-%d %H:%M:%S} {event.outcome:<7} {event.action:<20} "
                f"{event.target or '-':<24} by {event.actor} ({event.role or '?'}) "
                f"from {event.address or '-'}"
            )

    return audit_log
