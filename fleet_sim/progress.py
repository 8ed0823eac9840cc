"""Showing the simulated fleet's progress: a rich live table, or a log line now and then."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet_sim.stats import SimStats

__all__ = ["Display", "LiveDisplay", "LogDisplay", "summary_line"]

logger = logging.getLogger(__name__)

# The live table redraws this often; more costs CPU that ten thousand sessions need.
_LIVE_REFRESH_PER_S = 2


class Display(Protocol):
    """Shows ``stats`` until cancelled."""

    async def run(self, stats: SimStats) -> None:
        """Show progress until cancelled."""
        ...


def _lag(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def summary_line(stats: SimStats) -> str:
    """One line with the figures that matter."""
    p50, p99, _ = stats.lag_percentiles()
    enrolled = stats.enrolled_new + stats.enrolled_reused
    return (
        f"enrolled {enrolled}/{stats.devices} ({stats.enrolled_new} new)  "
        f"connected {stats.connected}/{stats.devices}  "
        f"sent {sum(stats.published.values())}  receipted {stats.confirmed}  "
        f"commands {stats.commands}  acks {stats.published.get('acks', 0)}  "
        f"lost {stats.connection_losses}  receipt lag p50 {_lag(p50)} p99 {_lag(p99)}"
    )


class LiveDisplay:
    """A table redrawn in place on the terminal (stderr)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    async def run(self, stats: SimStats) -> None:
        """Redraw the table until cancelled."""
        with Live(
            self._render(stats),
            console=self._console,
            refresh_per_second=_LIVE_REFRESH_PER_S,
            transient=False,
        ) as live:
            while True:
                await asyncio.sleep(1 / _LIVE_REFRESH_PER_S)
                live.update(self._render(stats))

    def _render(self, stats: SimStats) -> Table:
        now, sent = time.monotonic(), sum(stats.published.values())
        then, before = self._last
        if now - then >= 1:
            self._rate = (sent - before) / (now - then)
            self._last = (now, sent)
        p50, p99, samples = stats.lag_percentiles()
        table = Table(title=f"edgefleet-sim: {stats.devices} devices", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        enrolled = stats.enrolled_new + stats.enrolled_reused
        rows = [
            ("enrolled", f"{enrolled} ({stats.enrolled_new} new, {stats.enrolled_reused} reused)"),
            ("connected", f"{stats.connected} now, {len(stats.ever_connected)} ever"),
            (
                "connections",
                f"{stats.connects} made, {stats.connect_failures} failed, "
                f"{stats.connection_losses} lost",
            ),
            ("messages sent", f"{sent} ({self._rate:.0f}/s)"),
            (
                "  by topic",
                ", ".join(f"{k} {v}" for k, v in sorted(stats.published.items())) or "-",
            ),
            ("receipted", f"{stats.confirmed} in {stats.receipts} receipts"),
            ("commands / acks", f"{stats.commands} / {stats.published.get('acks', 0)}"),
            ("receipt lag", f"p50 {_lag(p50)}, p99 {_lag(p99)} ({samples} samples)"),
            ("dropped", str(stats.dropped)),
        ]
        if stats.enroll_retries:
            rows.append(("enroll retries", str(stats.enroll_retries)))
        for label, value in rows:
            table.add_row(label, value)
        return table


class LogDisplay:
    """:func:`summary_line` logged every ``interval_s`` seconds (``--no-progress``)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s

    async def run(self, stats: SimStats) -> None:
        """Log a summary line every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            logger.info("%s", summary_line(stats))
