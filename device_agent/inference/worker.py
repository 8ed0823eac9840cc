"""One model in one worker process: spawned, loaded once, fed requests over a pipe.

The worker (``_worker_main``, in the child) loads the model, says ``_Ready`` with what it found,
then answers ``_Run`` messages one at a time: ``_Chunk`` messages while a chat streams, then
``_Done`` or ``_Failed``. Between streamed chunks it looks for a ``_Cancel``. It exits on
``_Stop``, or when the pipe closes because the agent is gone.

The agent side (:class:`WorkerProcess`) reads the pipe in one named task per worker that routes
messages to the request in flight; end of file on the pipe is how a crash, an OOM kill or a
SIGKILL shows up, and sets :attr:`WorkerProcess.exited`. Spawn (not fork) keeps the agent's
threads, sockets and event loop out of the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from device_agent.inference.errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelLoadError,
    WorkerCrashedError,
)
from device_agent.inference.inputs import InferenceInput, ProbeInput
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.runtime import LoadedModel, RuntimeOptions, load_model
from device_agent.inference.spec import ModelInfo, ModelSpec

__all__ = ["WorkerProcess"]

logger = logging.getLogger(__name__)

# Linux prctl option: the kernel signals the worker when the agent dies, so a SIGKILLed agent
# leaves no model process holding memory behind.
_PR_SET_PDEATHSIG = 1


# --- messages on the pipe (pickled) ---


@dataclass(frozen=True)
class _Run:
    request_id: int
    request: InferenceInput | ProbeInput
    stream: bool


@dataclass(frozen=True)
class _Cancel:
    request_id: int


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Ready:
    info: ModelInfo


@dataclass(frozen=True)
class _LoadFailed:
    message: str


@dataclass(frozen=True)
class _Chunk:
    request_id: int
    text: str


@dataclass(frozen=True)
class _Done:
    request_id: int
    output: InferenceOutput


@dataclass(frozen=True)
class _Failed:
    request_id: int
    invalid_input: bool
    message: str


@dataclass(frozen=True)
class _Died:
    """Not sent: what the reader hands the request in flight when the pipe closes."""


# --- the worker process ---


def _worker_main(
    conn: multiprocessing.connection.Connection, spec: ModelSpec, options: RuntimeOptions
) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the agent stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        model = load_model(spec, options)
    except ModelLoadError as exc:
        conn.send(_LoadFailed(str(exc)))
        return
    # The worker's outer boundary: whatever else a runtime raises while loading is a bad model,
    # reported to the agent as such rather than as a dead process.
    except Exception as exc:
        conn.send(_LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(_Ready(model.info))
    try:
        _serve(conn, model)
    finally:
        model.close()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _serve(conn: multiprocessing.connection.Connection, model: LoadedModel) -> None:
    # Requests that arrived while a stream was being answered (read while looking for a
    # cancel); answered next, in order.
    pending: deque[object] = deque()
    while True:
        if pending:
            message = pending.popleft()
        else:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the agent is gone
        if isinstance(message, _Stop):
            return
        if isinstance(message, _Run) and not _answer(conn, model, message, pending):
            return


def _answer(
    conn: multiprocessing.connection.Connection,
    model: LoadedModel,
    run: _Run,
    pending: deque[object],
) -> bool:
    """Answer one request; False if a _Stop arrived while streaming."""
    keep_serving = True
    try:
        if not run.stream:
            conn.send(_Done(run.request_id, model.run(run.request)))
            return True
        assert not isinstance(run.request, ProbeInput)
        for item in model.stream(run.request):
            if isinstance(item, InferenceOutput):
                conn.send(_Done(run.request_id, item))
                break
            conn.send(_Chunk(run.request_id, item))
            cancelled, keep_serving = _poll_cancel(conn, run.request_id, pending)
            if cancelled:
                conn.send(_Failed(run.request_id, False, "cancelled"))
                break
    except InvalidInputError as exc:
        conn.send(_Failed(run.request_id, True, str(exc)))
    except InferenceError as exc:
        conn.send(_Failed(run.request_id, False, str(exc)))
    # The worker's outer boundary: one request's unexpected error fails that request only.
    except Exception as exc:
        conn.send(_Failed(run.request_id, False, f"{type(exc).__name__}: {exc}"))
    return keep_serving


def _poll_cancel(
    conn: multiprocessing.connection.Connection, request_id: int, pending: deque[object]
) -> tuple[bool, bool]:
    """(cancelled, keep serving) from what the agent sent while we streamed."""
    cancelled, keep_serving = False, True
    while conn.poll():
        message = conn.recv()
        if isinstance(message, _Cancel):
            cancelled = cancelled or message.request_id == request_id
        elif isinstance(message, _Stop):
            # Finish this answer (a model swap must not cut a stream short), then exit.
            keep_serving = False
        else:
            pending.append(message)
    return cancelled, keep_serving


# --- the agent side ---


class WorkerProcess:
    """The agent's handle on one worker process; one request at a time (the pool sees to it)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        spec: ModelSpec,
        process: multiprocessing.process.BaseProcess,
        conn: multiprocessing.connection.Connection,
        info: ModelInfo,
    ) -> None:
        self.spec = spec
        self.info = info
        self.exited = asyncio.Event()
        self.exitcode: int | None = None
        # Why the agent ended this worker itself ("stopped", "timed out"); None for a crash.
        self.ended_by_agent: str | None = None
        self._process = process
        self._conn = conn
        # Sends come from executor threads (big tensors) and the loop (cancel); one at a time.
        self._send_lock = threading.Lock()
        self._current: tuple[int, asyncio.Queue[Any]] | None = None
        self._reader = asyncio.create_task(self._read(), name=f"worker-reader:{spec.name}")

    @property
    def alive(self) -> bool:
        """Whether the worker can take a request: not ended, not being ended by the agent."""
        return not self.exited.is_set() and self.ended_by_agent is None

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        return self._process.pid

    @classmethod
    async def start(
        cls, spec: ModelSpec, options: RuntimeOptions, *, load_timeout_s: float
    ) -> WorkerProcess:
        """Spawn a worker and wait until it has loaded ``spec``; ModelLoadError otherwise."""
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        # A plain dict pickles whatever Mapping the caller built the spec with.
        picklable = replace(spec, files=dict(spec.files))
        process = context.Process(
            target=_worker_main,
            args=(child_conn, picklable, options),
            name=f"edgefleet-model-{spec.name}",
            daemon=True,
        )
        started = time.perf_counter()
        await asyncio.to_thread(process.start)
        # Our copy of the child's end must go, or we would never see end of file when it dies.
        child_conn.close()
        try:
            async with asyncio.timeout(load_timeout_s):
                message = await _receive(parent_conn)
        except TimeoutError:
            await _reap(process, parent_conn, kill=True)
            raise ModelLoadError(
                f"model {spec.name!r} did not load within {load_timeout_s:g} s "
                "(inference.load_timeout_s); the worker was killed"
            ) from None
        except (EOFError, OSError):
            exitcode = await _reap(process, parent_conn, kill=False)
            raise ModelLoadError(
                f"the worker loading model {spec.name!r} died ({_describe_exit(exitcode)}); "
                "the file is probably corrupt or too large for this device's memory"
            ) from None
        except asyncio.CancelledError:
            await _reap(process, parent_conn, kill=True)
            raise
        if isinstance(message, _LoadFailed):
            await _reap(process, parent_conn, kill=False)
            raise ModelLoadError(message.message)
        if not isinstance(message, _Ready):
            await _reap(process, parent_conn, kill=True)
            raise ModelLoadError(f"the worker of model {spec.name!r} answered {message!r}")
        logger.info(
            "model worker ready model=%s version=%s runtime=%s pid=%s load_s=%.2f",
            spec.name,
            spec.version,
            spec.runtime.value,
            process.pid,
            time.perf_counter() - started,
        )
        return cls(spec, process, parent_conn, message.info)

    async def run(
        self, request: InferenceInput | ProbeInput, *, stream: bool, deadline: float
    ) -> AsyncGenerator[str | InferenceOutput]:
        """Send one request; yield its chunks, then its output (latency_ms filled in).

        ``deadline`` is on the loop's clock. Raises InvalidInputError, InferenceError,
        InferenceTimeoutError (the worker is then killed: it may be stuck) or
        WorkerCrashedError.
        """
        if self.exited.is_set():
            raise self._crashed()
        request_id = next(self._ids)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._current = (request_id, inbox)
        finished = False
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.to_thread(self._send, _Run(request_id, request, stream))
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await inbox.get()
                except TimeoutError:
                    self.kill("timed out")
                    raise InferenceTimeoutError(
                        f"model {self.spec.name!r} did not answer within the request timeout "
                        "(inference.request_timeout_s); its worker is restarted"
                    ) from None
                if isinstance(message, _Chunk):
                    yield message.text
                elif isinstance(message, _Done):
                    finished = True
                    latency_ms = (time.perf_counter() - started) * 1000
                    yield replace(message.output, latency_ms=latency_ms)
                    return
                elif isinstance(message, _Failed):
                    finished = True
                    error = InvalidInputError if message.invalid_input else InferenceError
                    raise error(message.message)
                else:
                    finished = True
                    raise self._crashed()
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            finished = True
            raise self._crashed() from exc
        finally:
            if self._current is not None and self._current[0] == request_id:
                self._current = None
            if not finished and not self.exited.is_set():
                # Abandoned (the client went away): let the worker stop generating early.
                self._send_nowait(_Cancel(request_id))

    def _crashed(self) -> WorkerCrashedError:
        reason = self.ended_by_agent or _describe_exit(self.exitcode)
        return WorkerCrashedError(
            f"the worker of model {self.spec.name!r} (pid {self.pid}) ended during the "
            f"request ({reason}); it is being restarted"
        )

    def _send(self, message: object) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _send_nowait(self, message: object) -> None:
        # A small message, from the loop: skipped if a big send holds the pipe (rare; the
        # worker then just finishes the abandoned request).
        if self._send_lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):
                    self._conn.send(message)
            finally:
                self._send_lock.release()

    async def _read(self) -> None:
        """Route every message to the request in flight; on end of file, mark the exit."""
        try:
            while True:
                message = await _receive(self._conn)
                current = self._current
                request_id = getattr(message, "request_id", None)
                if current is not None and current[0] == request_id:
                    current[1].put_nowait(message)
        except (EOFError, OSError):
            pass
        self.exitcode = await _reap(self._process, self._conn, kill=False)
        self.exited.set()
        if self._current is not None:
            self._current[1].put_nowait(_Died())

    def kill(self, reason: str) -> None:
        """SIGKILL the worker now (a hung model); its reader sees it end."""
        if self.ended_by_agent is None:
            self.ended_by_agent = reason
        if self._process.pid is not None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGKILL)

    async def stop(self, timeout_s: float) -> None:
        """Ask the worker to finish its request and exit; SIGKILL after ``timeout_s``."""
        if self.ended_by_agent is None:
            self.ended_by_agent = "stopped"
        if not self.exited.is_set():
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(self._send, _Stop())
            try:
                async with asyncio.timeout(timeout_s):
                    await self.exited.wait()
            except TimeoutError:
                logger.warning(
                    "model worker did not stop in time model=%s pid=%s; killing it",
                    self.spec.name,
                    self.pid,
                )
                self.kill("stopped")
                await self.exited.wait()
        await self._reader


async def _receive(conn: multiprocessing.connection.Connection) -> Any:
    """The next message: waits on the loop until the pipe is readable, reads in a thread."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    # The reading itself may wait for the rest of a large message (an output tensor), so it
    # runs in a thread; end of file raises EOFError there.
    return await asyncio.to_thread(conn.recv)


async def _reap(
    process: multiprocessing.process.BaseProcess,
    conn: multiprocessing.connection.Connection,
    *,
    kill: bool,
) -> int | None:
    """Wait for the process to end (killing it first if asked); its exit code."""
    if kill and process.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    await asyncio.to_thread(process.join, _REAP_TIMEOUT_S)
    if process.exitcode is None and process.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.join)
    conn.close()
    return process.exitcode


# A worker whose pipe closed exits at once (it is dead, or returning from main); this only
# bounds the wait for one that closed the pipe and then hung on its way out.
_REAP_TIMEOUT_S = 5.0


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", likely the kernel's OOM killer" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"
