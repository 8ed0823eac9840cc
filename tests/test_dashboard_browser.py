"""The dashboard in headless Debian Chromium: log in, see devices online, watch one go offline."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import Session

from fleet_service.tables import TelemetryHourly
from tests.fixtures.fleet import Fleet

pytestmark = pytest.mark.browser


def test_operator_logs_in_sees_devices_live_and_one_turns_offline(
    sqlite_fleet: Fleet, page: Page
) -> None:
    fleet = sqlite_fleet
    agents = [fleet.start_agent(fleet.enroll(name)) for name in ("cam-1", "cam-2")]

    page.goto(f"{fleet.url}/")
    expect(page).to_have_url(f"{fleet.url}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not-the-password")
    page.click("text=Sign in")
    expect(page.get_by_test_id("login-error")).to_contain_text("incorrect")
    page.fill("input[name=password]", fleet.admin_password)
    page.click("text=Sign in")

    expect(page.get_by_test_id("live-indicator")).to_have_attribute("data-state", "live")
    for agent in agents:
        row = page.locator(f'tr[data-device-id="{agent.device_id}"]')
        expect(row.get_by_test_id("status")).to_have_text("online", timeout=20_000)
    page.screenshot(path=str(fleet.tmp / "devices.png"))

    agents[0].kill()

    dead = page.locator(f'tr[data-device-id="{agents[0].device_id}"]')
    expect(dead.get_by_test_id("status")).to_have_text("offline", timeout=30_000)
    alive = page.locator(f'tr[data-device-id="{agents[1].device_id}"]')
    expect(alive.get_by_test_id("status")).to_have_text("online")


def test_device_page_shows_telemetry_charts(sqlite_fleet: Fleet, page: Page) -> None:
    fleet = sqlite_fleet
    agent = fleet.start_agent(fleet.enroll("chart"))
    page.goto(f"{fleet.url}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", fleet.admin_password)
    page.click("text=Sign in")

    page.locator(f'tr[data-device-id="{agent.device_id}"] a').first.click()

    expect(page).to_have_url(f"{fleet.url}/devices/{agent.device_id}", timeout=10_000)
    cpu = page.get_by_test_id("chart-cpu")
    expect(cpu).to_be_visible()
    expect(cpu).not_to_have_attribute("data-points", "0", timeout=20_000)
    page.screenshot(path=str(fleet.tmp / "device.png"))


def test_a_long_range_charts_the_hourly_rollups(sqlite_fleet: Fleet, page: Page) -> None:
    fleet = sqlite_fleet
    state_dir = fleet.enroll("history")
    device_id = json.loads((state_dir / "device.json").read_text())["device_id"]
    # Five days of hours, as the retention job leaves them once the raw samples are gone.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hours = [
        TelemetryHourly(
            device_id=device_id,
            hour=now - timedelta(hours=n),
            samples=120,
            cpu_min=n % 100,
            cpu_max=n % 100,
            cpu_sum=(n % 100) * 120,
            memory_min=1,
            memory_max=1,
            memory_sum=120,
            disk_sum=120,
            load_min=1,
            load_max=1,
            load_sum=120,
            memory_used_sum=120,
            memory_total_max=2,
            net_sent_max=n,
            net_recv_max=n,
            uptime_max=n,
        )
        for n in range(1, 121)
    ]
    with Session(fleet.engine) as session:
        session.add_all(hours)
        session.commit()
    page.goto(f"{fleet.url}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", fleet.admin_password)
    page.click("text=Sign in")
    expect(page.get_by_test_id("live-indicator")).to_have_attribute("data-state", "live")

    page.goto(f"{fleet.url}/devices/{device_id}?range=7d")
    expect(page.locator('[data-range="7d"]')).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_test_id("chart-cpu")).to_have_attribute("data-points", "120", timeout=20_000)
    page.locator('[data-range="1h"]').click()  # the raw samples: none in the last hour
    expect(page.get_by_test_id("chart-cpu")).to_have_attribute("data-points", "0", timeout=20_000)
