"""Reading mosquitto's log: which identities connected from where, and which took over others."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["BROKER_LOG_TAIL_BYTES", "BrokerActivity", "parse_broker_log", "read_broker_log"]

# Bytes read from the end of each broker log file. The supervisor rotates the log past 10 MiB,
# so this reads a whole file; against an unrotated external log it bounds each audit's cost.
BROKER_LOG_TAIL_BYTES = 16 * 1024 * 1024

# "<time>: <message>", the time as broker/templates/mosquitto.conf.tmpl sets it (local time), or
# mosquitto's default epoch seconds for a broker configured elsewhere.
_STAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d|\d{9,}): (.*)$")
# Mosquitto 2.0 when a second connection presents a client id that is already connected; with
# use_username_as_clientid the id is the certificate CN (checked against mosquitto 2.0.11).
_TAKEOVER = re.compile(r"^Client (\S+) already connected, closing old connection\.$")
_CONNECTED = re.compile(r"^New client connected from (\S+) as (\S+) \(")


@dataclass
class BrokerActivity:
    """Per identity: when its connections took over an existing one, and where it connected."""

    takeovers: dict[str, list[datetime]] = field(default_factory=dict)
    connections: dict[str, list[tuple[datetime, str]]] = field(default_factory=dict)

    def last_connected(self, identity: str) -> datetime | None:
        """When ``identity`` last connected, as far as the log tells."""
        seen = self.connections.get(identity)
        return seen[-1][0] if seen else None

    def addresses(self, identity: str, since: datetime) -> list[str]:
        """The distinct hosts ``identity`` connected from since ``since``, in order seen."""
        hosts = [host for at, host in self.connections.get(identity, ()) if at >= since]
        return list(dict.fromkeys(hosts))


def _stamp(text: str) -> datetime:
    if text.isdigit():
        return datetime.fromtimestamp(int(text), UTC)
    # Naive local time, as mosquitto's strftime wrote it; astimezone reads it as local.
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").astimezone(UTC)


def parse_broker_log(lines: Iterable[str]) -> BrokerActivity:
    """The connections and takeovers in mosquitto log ``lines``; other lines are ignored."""
    activity = BrokerActivity()
    for line in lines:
        stamped = _STAMPED.match(line.rstrip("\r\n"))
        if stamped is None:
            continue
        message = stamped.group(2)
        if takeover := _TAKEOVER.match(message):
            activity.takeovers.setdefault(takeover.group(1), []).append(_stamp(stamped.group(1)))
        elif connected := _CONNECTED.match(message):
            host = connected.group(1).rpartition(":")[0] or connected.group(1)
            activity.connections.setdefault(connected.group(2), []).append(
                (_stamp(stamped.group(1)), host)
            )
    return activity


def _tail_lines(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - BROKER_LOG_TAIL_BYTES))
        if size > BROKER_LOG_TAIL_BYTES:
            f.readline()  # the first line is cut short
        for raw in f:
            yield raw.decode("utf-8", errors="replace")


def read_broker_log(paths: Iterable[Path]) -> BrokerActivity | None:
    """What the broker logs at ``paths`` (oldest first) say; None when none of them exists."""
    existing = [p for p in paths if p.is_file()]
    if not existing:
        return None

    def lines() -> Iterator[str]:
        for path in existing:
            yield from _tail_lines(path)

    return parse_broker_log(lines())
