"""The dashboard in headless Debian Chromium: log in, see devices online, watch one go offline."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

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
