"""Structured logs: JSON lines (or key=value text on a terminal) carrying the ids of what a line
is about, from the formatter up to a real service and a real agent writing to their log files."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_protocol.logs import log_context, log_handler
from tests.fixtures.fleet import Fleet, start_fleet, wait_until


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("tests.logging")
    log.propagate = False  # pytest's capture on the root logger stays out of it
    log.setLevel(logging.DEBUG)
    yield log
    log.handlers.clear()


def test_json_lines_carry_level_logger_time_and_the_bound_ids(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(log_handler("json", stream=stream, defaults={"device_id": "dev-1"}))
    with log_context(command_id="cmd-1", deployment_id=None):
        logger.warning("ack %s", "late", extra={"release_id": "rel-9"})
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "ack late" and first["level"] == "WARNING"
    assert first["logger"] == "tests.logging" and first["time"].startswith("20")
    assert (first["device_id"], first["command_id"], first["release_id"]) == (
        "dev-1",
        "cmd-1",
        "rel-9",
    )
    assert "deployment_id" not in first  # None is left out
    assert "command_id" not in second and second["device_id"] == "dev-1"


def test_an_exception_stays_one_json_line(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(log_handler("json", stream=stream))
    try:
        raise ValueError("broken\non two lines")
    except ValueError:
        logger.exception("it failed")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert "ValueError: broken" in record["exc_info"]


def test_text_puts_the_ids_after_the_message_and_the_traceback_below(
    logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    logger.addHandler(log_handler("text", stream=stream))
    with log_context(request_id="r-1"):
        try:
            raise KeyError("x")
        except KeyError:
            logger.exception("lookup failed")
    head, *trace = stream.getvalue().splitlines()
    assert head.endswith("level=ERROR logger=tests.logging lookup failed request_id=r-1")
    assert trace[0] == "Traceback (most recent call last):"


def test_auto_is_text_on_a_terminal_and_json_elsewhere(logger: logging.Logger) -> None:
    main, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal, os.fdopen(main, "rb", buffering=0) as reader:
        handler = log_handler("auto", stream=terminal)
        logger.addHandler(handler)
        logger.info("to a person")
        terminal.flush()
        shown = reader.read(4096).decode()
        logger.removeHandler(handler)
    assert "level=INFO logger=tests.logging to a person" in shown
    piped = io.StringIO()  # not a terminal, as under systemd or in a container
    logger.addHandler(log_handler("auto", stream=piped))
    logger.info("to a shipper")
    assert json.loads(piped.getvalue())["message"] == "to a shipper"


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):  # the broker's own lines, relayed by the supervisor, are not
            lines.append(json.loads(line))
    return lines


@pytest.fixture
def json_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose service logs JSON, as it would under systemd or in a container."""
    fleet = start_fleet(tmp_path, None, extra_env={"EDGEFLEET_LOG_FORMAT": "json"})
    try:
        yield fleet
    finally:
        fleet.close()


def test_the_service_and_the_agent_log_json_with_request_device_and_command_ids(
    json_fleet: Fleet,
) -> None:
    fleet = json_fleet
    agent = fleet.start_agent(
        fleet.enroll("logs"), extra_env={"EDGEFLEET_AGENT_LOG_FORMAT": "json"}
    )
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", 30, 0.2, "online")

    # The caller's request id is answered and lands on the audit line of its change.
    response = fleet.api.post(
        f"/api/v1/devices/{agent.device_id}/commands",
        json={"type": "ping"},
        headers={"X-Request-ID": "trace-42"},
    )
    assert response.status_code in (200, 201, 202), response.text
    assert response.headers["X-Request-ID"] == "trace-42"
    command_id = response.json()["id"]
    # A request id that could forge log structure is replaced by a fresh one.
    forged = fleet.api.get("/api/v1/devices", headers={"X-Request-ID": 'x" level=ERROR'})
    assert (
        len(forged.headers["X-Request-ID"]) == 32 and "level" not in forged.headers["X-Request-ID"]
    )

    def audited() -> dict[str, Any] | None:
        for line in json_lines(fleet.log()):
            if line.get("request_id") == "trace-42" and line["message"].startswith("audit"):
                return line
        return None

    line = wait_until(audited, 10, 0.2, "the audit line of the command")
    assert line["device_id"] == agent.device_id  # bound from the route's path
    assert line["level"] == "INFO" and line["logger"] == "fleet_service.audit"

    def acknowledged() -> dict[str, Any] | None:
        log = (agent.state_dir / "agent.log").read_text(errors="replace")
        for entry in json_lines(log):
            if entry.get("command_id") == command_id and "succeeded" in entry["message"]:
                return entry
        return None

    entry = wait_until(acknowledged, 20, 0.2, "the agent's line for the command")
    assert entry["device_id"] == agent.device_id
