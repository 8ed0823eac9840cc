"""The ``edgefleet-sim`` command line: N simulated devices, each a real enrolled mTLS session."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from device_agent.config import ENV_PREFIX, AgentSettings
from device_agent.connection import PAHO_LOGGER_NAME
from device_agent.enrollment import parse_token
from device_agent.errors import InvalidTokenError
from fleet_protocol import JoinToken
from fleet_protocol.process import skip_exit_collection
from fleet_sim.errors import SimError, SimUsageError
from fleet_sim.progress import Display, LiveDisplay, LogDisplay, summary_line
from fleet_sim.runner import run_fleet
from fleet_sim.settings import SimSettings
from fleet_sim.stats import SimStats

__all__ = ["app", "main"]

logger = logging.getLogger("fleet_sim")

# Exit codes as the agent's: 2 when what was typed must change, 1 when the world failed.
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Open files besides the sessions: the interpreter, logs, HTTPS clients, SQLite while a command
# runs, the thread pools' wake-up pipes.
_SPARE_FILES = 256

app = typer.Typer(
    name="edgefleet-sim",
    help="Simulate N edgefleet devices in one process: each enrolls through the REST API with a "
    "join token and holds its own mTLS MQTT session, sending telemetry and results and "
    "answering commands as edgefleet-agent does.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    devices: Annotated[int, typer.Option("--devices", min=1, help="How many devices to simulate.")],
    join_token: Annotated[
        str | None,
        typer.Option(
            "--join-token",
            envvar="EDGEFLEET_SIM_JOIN_TOKEN",
            help="Join token from `edgefleet keys create --max-uses N` (needed only while some "
            "device is not enrolled yet).",
            show_default=False,
        ),
    ] = None,
    join_token_file: Annotated[
        Path | None,
        typer.Option(
            "--join-token-file",
            help="Read the join token from this file (keeps it out of the process list).",
            show_default=False,
        ),
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Where the devices' identities are kept and reused."),
    ] = Path(".edgefleet-sim"),
    telemetry_interval: Annotated[
        float,
        typer.Option("--telemetry-interval", help="Seconds between a device's telemetry."),
    ] = 30.0,
    results_interval: Annotated[
        float,
        typer.Option(
            "--results-interval",
            help="Mean seconds between a device's inference results; 0 sends none.",
        ),
    ] = 300.0,
    enroll_concurrency: Annotated[
        int, typer.Option("--enroll-concurrency", help="Enrollments in flight at once.")
    ] = 8,
    duration: Annotated[
        float, typer.Option("--duration", help="Seconds to run; 0 runs until Ctrl-C.")
    ] = 0.0,
    no_progress: Annotated[
        bool,
        typer.Option(
            "--no-progress", help="No live display; log a summary line every 10 s instead."
        ),
    ] = False,
    stats_file: Annotated[
        Path | None,
        typer.Option(
            "--stats-file", help="Write a JSON snapshot of the counters here every second."
        ),
    ] = None,
    lag_window: Annotated[
        float,
        typer.Option(
            "--lag-window",
            help="Seconds of receipt lags the p50/p99 cover (shown and in the stats file).",
        ),
    ] = 60.0,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
) -> None:
    """Run the simulated devices until Ctrl-C (or --duration); each then announces offline."""
    if join_token is not None and join_token_file is not None:
        _fail(SimUsageError("give --join-token or --join-token-file, not both"), EXIT_USAGE)
    token_text = join_token if join_token_file is None else _read_token_file(join_token_file)
    sim = _sim_settings(
        devices=devices,
        join_token=token_text,
        state_dir=state_dir,
        telemetry_interval_s=telemetry_interval,
        results_interval_s=results_interval,
        enroll_concurrency=enroll_concurrency,
        duration_s=duration,
        progress=not no_progress and sys.stderr.isatty(),
        stats_file=stats_file,
        lag_window_s=lag_window,
    )
    # The agents' own knobs (keepalive, backoff, receipt timeout...) from EDGEFLEET_AGENT_*.
    agent = _agent_settings(state_dir=state_dir, telemetry_interval_s=telemetry_interval)
    console = Console(stderr=True)
    _configure_logging(log_level.upper(), console if sim.progress else None)
    token = _parse_token(sim)
    _raise_file_limit(sim.devices)

    stats = SimStats(sim.devices, sim.lag_window_s)
    display: Display = (
        LiveDisplay(console) if sim.progress else LogDisplay(sim.progress_log_interval_s)
    )
    logger.info("starting %d simulated devices, identities in %s", sim.devices, sim.state_dir)
    try:
        asyncio.run(run_fleet(sim, agent, token, display, stats))
    except SimError as exc:
        _fail(exc, EXIT_USAGE if isinstance(exc, SimUsageError) else EXIT_FAILURE)
    finally:
        logger.info("stopped: %s", summary_line(stats))


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        _fail(SimUsageError(f"cannot read the join token file {path}: {exc}"), EXIT_USAGE)


def _parse_token(sim: SimSettings) -> JoinToken | None:
    if sim.join_token is None:
        return None
    try:
        return parse_token(sim.join_token.get_secret_value())
    except InvalidTokenError as exc:
        _fail(SimUsageError(str(exc)), EXIT_USAGE)


def _sim_settings(**values: Any) -> SimSettings:
    try:
        return SimSettings(**values)
    except ValidationError as exc:
        _fail(SimUsageError(f"invalid option ({_problems(exc)})"), EXIT_USAGE)


def _agent_settings(**values: Any) -> AgentSettings:
    try:
        return AgentSettings(**values)
    except ValidationError as exc:
        _fail(
            SimUsageError(
                f"invalid agent settings ({_problems(exc)}); fix the option or its "
                f"{ENV_PREFIX}* environment variable"
            ),
            EXIT_USAGE,
        )


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors()
    )


def _raise_file_limit(devices: int) -> None:
    """Each session is an open socket: raise the soft limit, or say how to."""
    needed = devices + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        _fail(
            SimUsageError(
                f"--devices {devices} needs about {needed} open files, but this process may "
                f"open {soft} (hard limit {hard}); raise it (`ulimit -n {needed}` as root or "
                "in limits.conf) or simulate fewer devices"
            ),
            EXIT_USAGE,
        )


def _configure_logging(level: str, console: Console | None) -> None:
    handler: logging.Handler = (
        RichHandler(console=console, show_path=False)
        if console is not None
        else logging.StreamHandler()
    )
    if console is None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # Thousands of devices: the agent's per-connection INFO lines and paho's packets would
    # drown what matters; the simulator's own counters say it instead.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("device_agent", PAHO_LOGGER_NAME, "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)


def _fail(exc: SimError, code: int) -> NoReturn:
    """Print the error's message (it names the fix) and exit without a traceback."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code) from None


def main() -> None:
    """Console-script entry point."""
    skip_exit_collection()
    app()


if __name__ == "__main__":
    main()
