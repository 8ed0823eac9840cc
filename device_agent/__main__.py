"""The ``edgefleet-agent`` command line: enroll, run and status."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from device_agent import __version__
from device_agent.agent import Agent
from device_agent.config import ENV_PREFIX, AgentSettings
from device_agent.connection import PAHO_LOGGER_NAME
from device_agent.enrollment import enroll as enroll_device
from device_agent.enrollment import parse_token
from device_agent.errors import AgentError, InvalidTokenError, StateDirError
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol.logs import LogFormat, configure_logging
from fleet_protocol.process import skip_exit_collection

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

# Exit codes: 2 when the operator must change what they typed or where they point us (token,
# settings, state dir), 1 when the world failed (network, service, broker).
EXIT_FAILURE = 1
EXIT_USAGE = 2

# `enroll -` reads the token from stdin.
STDIN_ARGUMENT = "-"

app = typer.Typer(
    name="edgefleet-agent",
    help="The edgefleet device agent: enroll this machine into a fleet, then run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StateDirOption = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar=f"{ENV_PREFIX}STATE_DIR",
        help="Directory holding the device key, certificates and identity.",
        show_default=False,
    ),
]


@app.command()
def enroll(
    token: Annotated[
        str,
        typer.Argument(
            help="The join token from `edgefleet keys create`, or '-' to read it from stdin "
            "(keeps it out of the process list and shell history).",
            show_default=False,
        ),
    ],
    state_dir: StateDirOption,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing identity in the state dir."),
    ] = False,
) -> None:
    """Enroll this device: create its key here, get a certificate from the fleet service."""
    settings = _settings(state_dir=state_dir)
    _configure_logging(settings.log_level)
    text = sys.stdin.read() if token == STDIN_ARGUMENT else token
    try:
        identity = enroll_device(
            parse_token(text), settings.state_dir, timeout=settings.http_timeout_s, force=force
        )
    except AgentError as exc:
        _fail(exc)
    typer.echo(f"enrolled as {identity.device_id}")
    typer.echo(f"identity, key and certificates written to {settings.state_dir}")
    typer.echo(f"start the agent with: edgefleet-agent run --state-dir {settings.state_dir}")


@app.command()
def run(
    state_dir: StateDirOption,
    telemetry_interval: Annotated[
        float | None,
        typer.Option(
            "--telemetry-interval",
            help="Seconds between telemetry samples (default 30; env "
            f"{ENV_PREFIX}TELEMETRY_INTERVAL_S).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help=f"DEBUG, INFO, WARNING or ERROR (default INFO; env {ENV_PREFIX}LOG_LEVEL).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the agent until SIGINT or SIGTERM; it then announces offline and exits 0."""
    overrides: dict[str, Any] = {"state_dir": state_dir}
    if telemetry_interval is not None:
        overrides["telemetry_interval_s"] = telemetry_interval
    if log_level is not None:
        overrides["log_level"] = log_level
    settings = _settings(**overrides)
    identity = _load_identity(settings)
    _configure_logging(settings.log_level, settings.log_format, device_id=identity.device_id)
    logger.info(
        "edgefleet-agent %s starting broker=%s:%d state_dir=%s",
        __version__,
        identity.mqtt_host,
        identity.mqtt_port,
        settings.state_dir,
    )
    try:
        restart = asyncio.run(_serve(settings, identity))
    except AgentError as exc:  # the state dir's databases cannot be opened
        _fail(exc)
    if restart:
        _restart()


@app.command()
def status(state_dir: StateDirOption) -> None:
    """Show this device's identity as enrolled in the state dir."""
    settings = _settings(state_dir=state_dir)
    state = StateDir(settings.state_dir)
    identity = _load_identity(settings)
    try:
        expiry = state.certificate_expiry()
    except AgentError as exc:
        _fail(exc)
    tags = ", ".join(f"{k}={v}" for k, v in sorted(identity.tags.items())) or "(none)"
    rows = [
        ("device id", identity.device_id),
        ("service", identity.service_url),
        ("broker", f"{identity.mqtt_host}:{identity.mqtt_port}"),
        ("topic prefix", identity.topic_prefix),
        ("tags", tags),
        ("enrolled at", identity.enrolled_at.isoformat()),
        ("cert expires", expiry.isoformat()),
        ("state dir", str(state.root)),
    ]
    for label, value in rows:
        typer.echo(f"{label + ':':<14}{value}")


async def _serve(settings: AgentSettings, identity: DeviceIdentity) -> bool:
    """Run the agent until a signal; whether it stopped to be restarted (a command asked)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, _request_stop, signum, stop)
        except NotImplementedError:
            # Windows' event loops have no signal handlers; Ctrl+C raises KeyboardInterrupt.
            continue
        installed.append(signum)
    agent = Agent(settings, identity)
    try:
        await agent.run(stop)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return agent.restart_requested and not stop.is_set()


def _restart() -> NoReturn:
    """Replace this process with a fresh agent run with the same command line and environment.

    Everything the old run owned (outbox, MQTT session, databases) is closed by now; whatever it
    had not delivered waits in the outbox for the new one.
    """
    argv = [sys.executable, *sys.orig_argv[1:]]
    logger.info("restarting: %s", " ".join(argv))
    logging.shutdown()  # flush the log before the process image is replaced
    # Our own interpreter with our own arguments, no shell involved.
    os.execv(sys.executable, argv)  # noqa: S606


def _request_stop(signum: signal.Signals, stop: asyncio.Event) -> None:
    logger.info("received %s; stopping", signum.name)
    stop.set()


def _settings(**values: Any) -> AgentSettings:
    try:
        return AgentSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        typer.echo(
            f"error: invalid agent settings ({problems}); fix the option or its "
            f"{ENV_PREFIX}* environment variable",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE) from None


def _load_identity(settings: AgentSettings) -> DeviceIdentity:
    """The enrolled identity, pointed at ``mqtt_host``/``mqtt_port`` when they are set."""
    try:
        identity = StateDir(settings.state_dir).load_identity()
    except AgentError as exc:
        _fail(exc)
    broker = {"mqtt_host": settings.mqtt_host, "mqtt_port": settings.mqtt_port}
    return identity.model_copy(update={k: v for k, v in broker.items() if v is not None})


def _fail(exc: AgentError) -> NoReturn:
    """Print the error's message (it names the fix) and exit without a traceback."""
    typer.echo(f"error: {exc}", err=True)
    usage = isinstance(exc, InvalidTokenError | StateDirError)
    raise typer.Exit(EXIT_USAGE if usage else EXIT_FAILURE) from None


def _configure_logging(
    level: str, log_format: LogFormat = "auto", *, device_id: str | None = None
) -> None:
    # Every line carries the device id (fleet_protocol/logs.py), so a shipper can mix devices.
    configure_logging(level, log_format, defaults={"device_id": device_id} if device_id else None)
    # paho logs every packet and httpx every request; only show them when asked for DEBUG.
    chatty_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in (PAHO_LOGGER_NAME, "httpx", "httpcore"):
        logging.getLogger(name).setLevel(chatty_level)


def main() -> None:
    """Console-script entry point."""
    skip_exit_collection()
    app()


if __name__ == "__main__":
    main()
