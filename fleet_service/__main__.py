"""The ``edgefleet`` command: init a fleet, run it, manage registration keys, run the demo."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet_protocol.logs import LogFormat, configure_logging
from fleet_protocol.process import skip_exit_collection
from fleet_service import cli_access, cli_identity, cli_sites, cli_webhooks
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
devices_app = typer.Typer(help="Enrolled devices and commands to them.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
replicas_app = typer.Typer(help="Extra service replicas sharing the load.", no_args_is_help=True)
app.add_typer(replicas_app, name="replicas")
deployments_app = typer.Typer(
    help="Model deployments: follow, pause, resume, roll back.", no_args_is_help=True
)
app.add_typer(deployments_app, name="deployments")
results_app = typer.Typer(help="Inference results from devices.", no_args_is_help=True)
app.add_typer(results_app, name="results")
models_app = typer.Typer(help="Model releases: upload, list.", no_args_is_help=True)
app.add_typer(models_app, name="models")
signing_app = typer.Typer(help="The keys that sign model manifests.", no_args_is_help=True)
app.add_typer(signing_app, name="signing")
app.add_typer(cli_webhooks.app, name="webhooks")
app.add_typer(cli_identity.integrations_app, name="integrations")
app.add_typer(cli_sites.sites_app, name="sites")
cli_identity.register_device_commands(devices_app)

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


def _configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    # The agent's format too (fleet_protocol/logs.py), so one log shipper reads both sides.
    configure_logging(level, log_format)


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
    replica: Annotated[
        str | None,
        typer.Option(help="Run as this replica (see `replicas add`): API and ingestion only."),
    ] = None,
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
        replica=replica,
        log_level=log_level,
    )
    if replica is not None and replica not in settings.replicas:
        raise typer.BadParameter(f"no replica {replica!r}; create it with `edgefleet replicas add`")
    _configure_logging(settings.log_level, settings.log_format)
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


@replicas_app.command("add")
def replicas_add(name: str, home: HomeOption = None) -> None:
    """Give a new service replica its own MQTT identity (restart the primary `up` after)."""
    from fleet_service.bootstrap import add_replica

    try:
        identity = add_replica(_settings(home), name)
    except ServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(f"replica {name} has the MQTT identity {identity}")
    typer.echo("restart the primary `edgefleet up` so the broker grants it, then run:")
    typer.echo(f"  edgefleet up --replica {name} --http-port <another port>")


@devices_app.command("list")
def devices_list(home: HomeOption = None) -> None:
    """List devices with status and last seen."""
    from fleet_service import cli_devices

    try:
        rows = cli_devices.list_all(_settings(home))
    except ServiceError as exc:
        raise _fail(exc) from exc
    if not rows:
        typer.echo("no devices; enroll one with `edgefleet-agent enroll TOKEN`")
    for d in rows:
        seen = f"{d.last_seen:%Y-%m-%d %H:%M:%S %Z}" if d.last_seen else "never"
        tags = ",".join(f"{k}={v}" for k, v in d.tags.items()) or "-"
        typer.echo(f"{d.id}  {d.status:<8} {d.hostname:<20} last seen {seen}  tags {tags}")


def _parse_params(params: list[str] | None) -> dict[str, str | int | float | bool | None]:
    parsed: dict[str, str | int | float | bool | None] = {}
    for param in params or []:
        key, sep, raw = param.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"param {param!r} must look like key=value", param_hint="--param"
            )
        try:
            # Numbers, true/false and null as JSON; anything else stays a string.
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list | dict):
            value = raw
        parsed[key] = value
    return parsed


ParamOption = Annotated[list[str] | None, typer.Option("--param", help="key=value (repeatable).")]
ExpiresOption = Annotated[str, typer.Option(help="Give up after: 30s, 5m, 1h.")]
WaitOption = Annotated[bool, typer.Option(help="Wait for the final state and print it.")]


@devices_app.command("command")
def devices_command(
    device_id: str,
    command_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="ping, set-config, collect-logs, restart-agent")
    ],
    home: HomeOption = None,
    param: ParamOption = None,
    expires: ExpiresOption = "5m",
    wait: WaitOption = True,
) -> None:
    """Send a command to one device and follow it to its final state."""
    _send(home, device_id, None, command_type, param, expires, wait=wait)


@devices_app.command("broadcast")
def devices_broadcast(
    command_type: Annotated[str, typer.Argument(metavar="TYPE")],
    tag: Annotated[str, typer.Option(help="Every device with this key=value.")],
    home: HomeOption = None,
    param: ParamOption = None,
    expires: ExpiresOption = "5m",
    wait: WaitOption = True,
) -> None:
    """Send the same command to every device carrying a tag."""
    _send(home, None, tag, command_type, param, expires, wait=wait)


def _send(
    home: Path | None,
    device_id: str | None,
    tag: str | None,
    command_type: str,
    param: list[str] | None,
    expires: str,
    *,
    wait: bool,
) -> None:
    from fleet_service import cli_devices
    from fleet_service.keys import parse_duration
    from fleet_service.schemas import CommandCreate

    settings = _settings(home)
    try:
        body = CommandCreate(
            type=command_type, params=_parse_params(param), expires_in_s=parse_duration(expires)
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        sent = cli_devices.send_command(settings, device_id, tag, body)
        for command in sent:
            typer.echo(f"{command.id} -> {command.device_id}: {command.status}")
        if wait:
            ids = [c.id for c in sent]
            for command in cli_devices.wait_for_final(settings, ids, body.expires_in_s + 5):
                result = json.dumps(command.result) if command.result else ""
                typer.echo(
                    f"{command.id} {command.device_id}: {command.status} "
                    f"{command.detail or ''} {result}".rstrip()
                )
    except ServiceError as exc:
        raise _fail(exc) from exc


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(help="The weights (.gguf, .tflite, .onnx).")],
    name: Annotated[str, typer.Option(help="Model name: a-z, 0-9, '_' and '-'.")],
    version: Annotated[str, typer.Option(help="Version label, e.g. 1.2.0.")],
    runtime: Annotated[str, typer.Option(help="gguf, tflite or onnx.")],
    home: HomeOption = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer file.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels file (one per line).")] = None,
    config: Annotated[Path | None, typer.Option(help="Model config file.")] = None,
    arch: Annotated[
        list[str] | None, typer.Option(help="CPU architecture allowed (repeatable): x86_64...")
    ] = None,
    min_ram: Annotated[int, typer.Option(min=0, help="Minimum free RAM in bytes.")] = 0,
    min_disk: Annotated[int, typer.Option(min=0, help="Minimum free disk in bytes.")] = 0,
    expires_in_days: Annotated[int, typer.Option(help="Manifest lifetime in days.")] = 365,
    encrypt: Annotated[
        bool, typer.Option(help="Store and serve the files sealed (AES-256-GCM).")
    ] = False,
) -> None:
    """Upload a model release: store its files, sign its manifest, record it."""
    from rich.console import Console

    from fleet_service import cli_models

    request = cli_models.PushRequest(
        weights=file,
        name=name,
        version=version,
        runtime=runtime,
        tokenizer=tokenizer,
        labels=labels,
        config=config,
        architectures=arch or (),
        min_ram_bytes=min_ram,
        min_disk_bytes=min_disk,
        expires_in_days=expires_in_days,
        encrypt=encrypt,
    )
    try:
        release = cli_models.push(_settings(home), request, Console(stderr=True))
    except ServiceError as exc:
        raise _fail(exc) from exc
    sealed = ", sealed" if release.encrypted else ""
    typer.echo(
        f"{release.id}: {release.name} {release.version} release {release.release} "
        f"({len(release.files)} file(s), {release.stored_bytes} bytes{sealed}), "
        f"signed by key {release.key_id}"
    )


@models_app.command("list")
def models_list(
    home: HomeOption = None,
    name: Annotated[str | None, typer.Option(help="Only releases of this model.")] = None,
) -> None:
    """List model releases, newest first."""
    from fleet_service import cli_models

    try:
        rows = cli_models.list_all(_settings(home), name)
    except ServiceError as exc:
        raise _fail(exc) from exc
    if not rows:
        typer.echo("no model releases; upload one with `edgefleet models push`")
    for r in rows:
        arch = ",".join(r.constraints.architectures) or "any"
        sealed = " sealed" if r.encrypted else ""
        typer.echo(
            f"{r.id}  {r.name:<20} {r.version:<12} release {r.release:<4} {r.runtime.value:<6} "
            f"{r.stored_bytes:>12} B  arch {arch}{sealed}  expires {r.expires_at:%Y-%m-%d}"
        )


@signing_app.command("list")
def signing_list(home: HomeOption = None) -> None:
    """List the trusted manifest signing keys; the active one signs new releases."""
    from fleet_service import cli_models

    try:
        keys = cli_models.signing_keys(_settings(home))
    except ServiceError as exc:
        raise _fail(exc) from exc
    for key in keys:
        marker = "active " if key.active else "trusted"
        typer.echo(f"{key.key_id}  {marker}  since {key.created_at:%Y-%m-%d %H:%M %Z}")


@signing_app.command("rotate")
def signing_rotate(home: HomeOption = None) -> None:
    """Make a new signing key active; releases signed before still verify (old key trusted)."""
    from fleet_service import cli_models

    try:
        key_id = cli_models.rotate_signing_key(_settings(home))
    except ServiceError as exc:
        raise _fail(exc) from exc
    typer.echo(f"new signing key {key_id} is active; earlier keys stay trusted")
    typer.echo("devices read the trusted keys from GET /api/v1/agent/signing-keys")


@app.command()
def deploy(
    release_id: Annotated[str, typer.Argument(help="The release to roll out (models list).")],
    home: HomeOption = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="A target device id (repeatable).")
    ] = None,
    tag: Annotated[str | None, typer.Option(help="Every device with this key=value.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Devices per batch.")] = 1,
    pause: Annotated[float, typer.Option(min=0, help="Seconds between batches.")] = 0.0,
    max_failure_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Failed/sent tolerated before halting.")
    ] = 0.0,
    canary: Annotated[
        str | None,
        typer.Option(help="Gate batch 1: metric:margin[:min_results], e.g. error_rate:0.05."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the rollout until it ends.")] = True,
) -> None:
    """Roll a model release out to devices in batches (by --device or --tag)."""
    from rich.console import Console

    from fleet_service import cli_deployments
    from fleet_service.schemas import DeploymentCreate

    if (tag is None) == (not device):
        raise typer.BadParameter("name the targets with --device (repeatable) or with --tag")
    try:
        body = DeploymentCreate(
            release_id=release_id,
            device_ids=device or None,
            tag=tag,
            batch_size=batch_size,
            pause_s=pause,
            max_failure_ratio=max_failure_ratio,
            canary=cli_deployments.parse_canary(canary) if canary else None,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = _settings(home)
    try:
        created = cli_deployments.create(settings, body)
        for line in cli_deployments.describe(created):
            typer.echo(line)
        if not wait:
            return
        final = cli_deployments.follow(settings, created.id, Console(stderr=True))
    except ServiceError as exc:
        raise _fail(exc) from exc
    for line in cli_deployments.describe(final):
        typer.echo(line)
    if final.state != "completed":
        raise typer.Exit(1)


@deployments_app.command("list")
def deployments_list(
    home: HomeOption = None,
    model: Annotated[str | None, typer.Option(help="Only deployments of this model.")] = None,
    state: Annotated[str | None, typer.Option(help="running, paused, halted, ...")] = None,
) -> None:
    """List deployments, newest first."""
    from fleet_service import cli_deployments

    try:
        rows = cli_deployments.list_all(_settings(home), model, state)
    except ServiceError as exc:
        raise _fail(exc) from exc
    if not rows:
        typer.echo("no deployments; start one with `edgefleet deploy RELEASE_ID --device ID`")
    for row in rows:
        typer.echo(cli_deployments.describe(row)[0])


@deployments_app.command("show")
def deployments_show(deployment_id: str, home: HomeOption = None) -> None:
    """One deployment with every target's state."""
    from fleet_service import cli_deployments

    try:
        found = cli_deployments.show(_settings(home), deployment_id)
    except ServiceError as exc:
        raise _fail(exc) from exc
    for line in cli_deployments.describe(found):
        typer.echo(line)


def _deployment_action(action: str, deployment_id: str, home: Path | None) -> None:
    from fleet_service import cli_deployments

    try:
        found = cli_deployments.act(_settings(home), action, deployment_id)
    except ServiceError as exc:
        raise _fail(exc) from exc
    for line in cli_deployments.describe(found):
        typer.echo(line)


@deployments_app.command("pause")
def deployments_pause(deployment_id: str, home: HomeOption = None) -> None:
    """Send no further batch until resumed."""
    _deployment_action("pause", deployment_id, home)


@deployments_app.command("resume")
def deployments_resume(deployment_id: str, home: HomeOption = None) -> None:
    """Carry on a paused deployment."""
    _deployment_action("resume", deployment_id, home)


@deployments_app.command("rollback")
def deployments_rollback(deployment_id: str, home: HomeOption = None) -> None:
    """Put every device the release reached back on its previous release (re-signed)."""
    _deployment_action("rollback", deployment_id, home)


@results_app.command("list")
def results_list(
    home: HomeOption = None,
    model: Annotated[str | None, typer.Option(help="Only results of this model.")] = None,
    device: Annotated[str | None, typer.Option(help="Only results of this device.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=5000)] = 20,
) -> None:
    """The newest inference results, newest first."""
    from fleet_service import cli_deployments

    try:
        rows = cli_deployments.results(_settings(home), model, device, limit)
    except ServiceError as exc:
        raise _fail(exc) from exc
    for row in rows:
        typer.echo(cli_deployments.result_line(row))


@results_app.command("summary")
def results_summary(
    home: HomeOption = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
) -> None:
    """Per model version: results, error rate, p50/p95 latency, confidence, tokens/s."""
    from fleet_service import cli_deployments

    try:
        rows = cli_deployments.summary(_settings(home), model, device)
    except ServiceError as exc:
        raise _fail(exc) from exc
    if not rows:
        typer.echo("no results yet")
    for row in rows:
        typer.echo(cli_deployments.summary_line(row))


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


@app.command("audit")
def audit_command(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    fail_on: Annotated[
        str, typer.Option(help="Exit 1 when a finding is at least this severe: high, medium, low.")
    ] = "high",
) -> None:
    """Run the fleet security audit now; exit 1 on high findings (see --fail-on)."""
    from fleet_service import cli_audit
    from fleet_service.security_audit import Severity

    try:
        threshold = Severity(fail_on)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{fail_on!r} is not a severity; use high, medium or low", param_hint="--fail-on"
        ) from exc
    try:
        report = cli_audit.audit(_settings(home))
    except ServiceError as exc:
        raise _fail(exc) from exc
    cli_audit.print_report(report, as_json=as_json)
    raise typer.Exit(cli_audit.exit_code(report, threshold))


# `users`, `tokens` and `audit-log` (fleet_service/cli_access.py).
cli_access.register(app, _settings)


def main() -> None:
    """Console-script entry point."""
    skip_exit_collection()
    app()


if __name__ == "__main__":
    main()
