"""Run a local ``mosquitto`` as a child process: start it, wait for it, restart it, stop it.

Errors::

    RuntimeError
     └── BrokerError
          └── BrokerStartError     mosquitto is missing, exits on start, or never listens
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import signal
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.config import BrokerConfig, ReadGrant, write_acl, write_broker_files

__all__ = [
    "BrokerError",
    "BrokerStartError",
    "MosquittoSupervisor",
    "log_tail",
]

logger = logging.getLogger(__name__)

# What mosquitto 2.0 logs (log type `information`) when it handles SIGHUP. Checked by experiment
# on 2.0.11: the reload re-reads the ACL, which then also applies to subscriptions made before
# it (read grants are checked per delivered message), and the listener's CA, certificate, key
# and CRL. Connections already open are not re-verified against a new CRL, so revoking an
# identity also needs its session dropped (fleet_service/revocation.py).
_RELOADED = b"Reloading config."


class BrokerError(RuntimeError):
    """Something went wrong with the supervised broker."""


class BrokerStartError(BrokerError):
    """Mosquitto could not be started; the message carries the end of its log."""


def stop_leftover(pid_file: Path, conf_path: Path, timeout: float) -> None:
    """Stop a mosquitto that a killed supervisor left running on ``conf_path`` (blocking).

    Mosquitto runs in its own session, so a SIGKILLed `edgefleet up` leaves it behind, holding
    the port. SIGTERM makes it save its persistence first, so the sessions and queued messages
    it holds survive into the new process. Linux only (/proc); elsewhere this does nothing.
    """
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, PermissionError):
        return
    if str(conf_path).encode() not in cmdline:
        return  # the pid was reused by something else
    logger.warning("stopping mosquitto pid %d left running by a previous supervisor", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _logged_since(path: Path, start: int, text: bytes) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(start)
            return text in f.read()
    except FileNotFoundError:
        return False


def log_tail(path: Path, lines: int = 15, *, start: int = 0) -> str:
    """The last ``lines`` lines of a log after byte ``start``, or a note that there are none."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            tail = deque(f, maxlen=lines)
    except FileNotFoundError:
        return f"(no log at {path})"
    return b"".join(tail).decode("utf-8", errors="replace").rstrip() or f"({path} is empty)"


class MosquittoSupervisor:
    """Own one ``mosquitto`` process for the lifetime of an ``async with`` block.

    Entering renders the config, starts mosquitto and returns once its TLS port accepts
    connections. A named watch task restarts it with capped, jittered exponential backoff when it
    exits on its own. Leaving stops it with SIGTERM, then SIGKILL after ``stop_timeout``.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        executable: str = "mosquitto",
        # First restart waits about this long: a crash loop must not spin a CPU, but a one-off
        # crash should cost devices only a moment.
        restart_backoff_min: float = 0.5,
        # Cap on the wait between restarts, so the broker is back soon after the cause is fixed.
        restart_backoff_max: float = 30.0,
        # A process that stayed up this long is healthy again: the next failure starts the
        # backoff from the minimum.
        stable_after: float = 60.0,
        # Mosquitto saves its persistence db on SIGTERM; give it time before SIGKILL.
        stop_timeout: float = 10.0,
        # Loading keys and the persistence db of a large fleet takes a while on a Raspberry Pi.
        ready_timeout: float = 15.0,
        # Readiness probe interval while waiting for the port.
        poll_interval: float = 0.05,
        # On start, a log past this size is moved to `<log>.1`, so a broker that runs for months
        # (every connection is logged) cannot fill the disk of a small host.
        log_rotate_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        self.config = config
        self.executable = executable
        self.restart_backoff_min = restart_backoff_min
        self.restart_backoff_max = restart_backoff_max
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.log_rotate_bytes = log_rotate_bytes
        self._restarts = 0
        self._log_start = 0  # where the current process's output begins in the log file
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False

    @property
    def restarts(self) -> int:
        """How many times the broker was started again after exiting on its own."""
        return self._restarts

    @property
    def pid(self) -> int | None:
        """The running mosquitto's pid, or None between a crash and its restart."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def host(self) -> str:
        """Where clients connect."""
        return self.config.bind_host

    @property
    def port(self) -> int:
        """The mTLS port."""
        return self.config.port

    async def __aenter__(self) -> Self:
        write_broker_files(self.config)
        self._stopping = False
        await self._stop_leftover()
        await self._start()
        self._watch = asyncio.create_task(self._watch_loop(), name="mosquitto-supervisor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        self._ready.clear()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._stop_process()

    # A timeout argument rather than asyncio.timeout at the caller: tests and the CLI wait on the
    # broker the same way they wait on everything else.
    async def wait_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once mosquitto accepts connections; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def reload(self) -> bool:
        """Ask mosquitto to re-read its config (ACL, CRL, certificates) with SIGHUP.

        Returns False when no process is running; the next restart reads the files anyway.
        Mosquitto 2.0.11 re-reads the CRL on SIGHUP (checked by experiment), so a revocation
        needs no restart, which would cut every device's connection.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            logger.warning("broker reload skipped: mosquitto is not running")
            return False
        try:
            proc.send_signal(signal.SIGHUP)
        except ProcessLookupError:
            return False
        logger.info("asked mosquitto (pid %d) to reload its configuration", proc.pid)
        return True

    def set_read_grants(self, grants: tuple[ReadGrant, ...]) -> bool:
        """Render ``grants`` into the ACL file; True when its text changed (then reload).

        The config object is replaced too, so a later restart renders the same ACL.
        """
        self.config = dataclasses.replace(self.config, read_grants=grants)
        return write_acl(self.config)

    # A timeout argument, like wait_ready: the policy loop passes its own setting.
    async def reload_confirmed(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Reload (SIGHUP) and wait until mosquitto's log says it re-read its files.

        False when no process is running or the log does not show the reload within
        ``timeout`` (e.g. `information` is not among log_types); the reload was still asked for.
        """
        log_path = self.config.log_path
        try:
            start = log_path.stat().st_size
        except FileNotFoundError:
            start = 0
        if not self.reload():
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await asyncio.to_thread(_logged_since, log_path, start, _RELOADED):
                return True
            await asyncio.sleep(self.poll_interval)
        logger.warning("mosquitto did not log a reload within %.1fs", timeout)
        return False

    @property
    def _pid_file(self) -> Path:
        return self.config.data_dir / "mosquitto.pid"

    async def _stop_leftover(self) -> None:
        await asyncio.to_thread(
            stop_leftover, self._pid_file, self.config.conf_path, self.stop_timeout
        )

    async def _start(self) -> None:
        """Spawn mosquitto and wait until it listens, or raise BrokerStartError."""
        executable = shutil.which(self.executable)
        if executable is None:
            raise BrokerStartError(
                f"{self.executable!r} was not found on PATH: install the Debian package "
                "mosquitto or run `make setup`"
            )
        log_path = self.config.log_path
        with contextlib.suppress(FileNotFoundError):
            if log_path.stat().st_size > self.log_rotate_bytes:
                log_path.replace(log_path.with_name(log_path.name + ".1"))
        # mosquitto logs to stderr (startup errors too, before any log file would be open);
        # appending it to one file keeps the history of every run, and no pipe needs draining.
        with log_path.open("ab") as log:
            self._log_start = log.tell()
            log.write(f"--- edgefleet: starting {executable} ---\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                executable,
                "-c",
                str(self.config.conf_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a Ctrl-C on the terminal must not kill the broker before the
                # service and its agents have shut down through it; the supervisor stops it last.
                start_new_session=True,
            )
        proc = self._proc
        self._pid_file.write_text(str(proc.pid))
        logger.info("started mosquitto pid %d on %s:%d", proc.pid, self.host, self.port)
        try:
            await self._wait_listening(proc)
        except BaseException:
            await self._stop_process()
            raise
        self._ready.set()

    async def _wait_listening(self, proc: asyncio.subprocess.Process) -> None:
        timeout = self.ready_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if proc.returncode is not None:
                raise BrokerStartError(
                    f"mosquitto exited with code {proc.returncode} on start; its log "
                    f"({self.config.log_path}) ends with:\n{self._log_tail()}"
                )
            if await self._port_open():
                # Something else may hold the port; ours must still be alive after binding.
                await asyncio.sleep(self.poll_interval)
                if proc.returncode is None:
                    return
                continue
            if loop.time() > deadline:
                raise BrokerStartError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{timeout:.0f}s; its log ends with:\n{self._log_tail()}"
                )
            await asyncio.sleep(self.poll_interval)

    def _log_tail(self) -> str:
        return log_tail(self.config.log_path, start=self._log_start)

    async def _port_open(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _watch_loop(self) -> None:
        failures = 0
        started = time.monotonic()
        while True:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                self._ready.clear()
                if self._stopping:
                    return
                if time.monotonic() - started >= self.stable_after:
                    failures = 0
                logger.warning(
                    "mosquitto pid %d exited unexpectedly with code %d; log tail:\n%s",
                    proc.pid,
                    code,
                    self._log_tail(),
                )
            delay = min(self.restart_backoff_max, self.restart_backoff_min * 2 ** min(failures, 16))
            # Jitter: a fleet of hosts restarting after a shared cause should not retry in step.
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - timing jitter, not cryptography
            failures += 1
            logger.info("restarting mosquitto in %.2fs (attempt %d)", delay, failures)
            await asyncio.sleep(delay)
            self._restarts += 1
            started = time.monotonic()
            try:
                await self._start()
            except (BrokerStartError, OSError) as exc:
                # Keep trying with a growing delay: the cause (a key being replaced, a port
                # briefly taken) is often fixed from outside without restarting the service.
                self._proc = None
                logger.warning("mosquitto restart failed: %s", exc)

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                logger.warning(
                    "mosquitto pid %d ignored SIGTERM for %.0fs; killing it",
                    proc.pid,
                    self.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        else:
            await proc.wait()
        logger.info("mosquitto pid %d stopped with code %s", proc.pid, proc.returncode)
