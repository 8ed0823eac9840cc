"""The dashboard's control plane in headless Chromium: commands, the live log tail, desired state.

Run alone with ``pytest -m dashboard_commands`` (or this file's path); it needs the built
dashboard (``make setup``) and Debian's chromium, like ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.fixtures.browser import sign_in
from tests.fixtures.fleet import Fleet, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.dashboard_commands]

# From sending a command to its final status: the agent must receive, run and ack it, and the
# service must store the ack and push it over SSE.
COMMAND_TIMEOUT_MS = 30_000
ONLINE_TIMEOUT_MS = 20_000


def send_command(page: Page, command_type: str, params: dict[str, str] | None = None) -> None:
    """Fill the device page's command form and send it."""
    form = page.get_by_test_id("command-form")
    form.locator("select[name=command-type]").select_option(command_type)
    rows = form.get_by_test_id("param-row")
    while rows.count() > 0:
        rows.first.get_by_role("button", name=re.compile(r"^Remove parameter")).click()
    for key, value in (params or {}).items():
        form.get_by_role("button", name="Add parameter").click()
        form.locator("input[name=param-key]").last.fill(key)
        form.locator("input[name=param-value]").last.fill(value)
    form.get_by_role("button", name="Send command").click()
    expect(form.get_by_test_id("command-error")).to_have_count(0)


def latest_command(page: Page, command_type: str) -> Locator:
    """The newest row of ``command_type`` in the device's command table (newest first)."""
    return page.locator(f'tr[data-command-id][data-command-type="{command_type}"]').first


def open_device_page(page: Page, fleet: Fleet, device_id: str) -> None:
    row = page.locator(f'tr[data-device-id="{device_id}"]')
    expect(row.get_by_test_id("status")).to_have_text("online", timeout=ONLINE_TIMEOUT_MS)
    row.locator("a").first.click()
    expect(page).to_have_url(f"{fleet.url}/devices/{device_id}", timeout=10_000)
    expect(page.get_by_test_id("device-hostname")).to_be_visible()


def test_operator_commands_a_device_tails_its_logs_and_sets_its_desired_state(
    sqlite_fleet: Fleet, page: Page
) -> None:
    fleet = sqlite_fleet
    agent = fleet.start_agent(fleet.enroll("ctl-1"))
    sign_in(page, fleet)
    open_device_page(page, fleet, agent.device_id)

    # A ping goes pending -> accepted -> running -> succeeded, live over SSE.
    send_command(page, "ping")
    ping = latest_command(page, "ping")
    expect(ping.get_by_test_id("command-status")).to_have_text(
        "succeeded", timeout=COMMAND_TIMEOUT_MS
    )
    expect(ping.get_by_test_id("command-result")).to_contain_text("pong=true")

    # Forward INFO records from now on; the next command's own INFO lines reach the tail live.
    send_command(page, "set-config", {"log_forward_level": "INFO"})
    set_config = latest_command(page, "set-config")
    expect(set_config.get_by_test_id("command-status")).to_have_text(
        "succeeded", timeout=COMMAND_TIMEOUT_MS
    )
    send_command(page, "ping")
    tail = page.get_by_test_id("log-tail")
    lines = tail.get_by_test_id("log-line")
    expect(tail.locator('[data-testid=log-line][data-level="INFO"]').first).to_be_visible(
        timeout=COMMAND_TIMEOUT_MS
    )

    # The level filter means "at or above"; the text filter narrows further.
    page.select_option("select[name=log-level]", "WARNING")
    expect(tail.locator('[data-testid=log-line][data-level="INFO"]')).to_have_count(0)
    levels = lines.evaluate_all("els => els.map((el) => el.dataset.level)")
    assert set(levels) <= {"WARNING", "ERROR", "CRITICAL"}, levels
    page.select_option("select[name=log-level]", "DEBUG")
    page.fill("input[name=log-filter]", "no line says this 7f3a")
    expect(lines).to_have_count(0)
    page.fill("input[name=log-filter]", "")
    expect(lines.first).to_be_visible(timeout=10_000)
    page.screenshot(path=str(fleet.tmp / "device-commands.png"), full_page=True)

    # A new desired telemetry interval: the generation moves on and the device catches up.
    panel = page.get_by_test_id("desired-panel")
    desired = panel.get_by_test_id("desired-generation")
    expect(desired).to_have_text(re.compile(r"^\d+$"))
    before = int(desired.inner_text())
    panel.locator("input[name=telemetry_interval_s]").fill("2")
    panel.get_by_role("button", name="Save desired state").click()
    expect(desired).to_have_text(str(before + 1))
    expect(panel.get_by_test_id("reported-generation")).to_have_text(
        str(before + 1), timeout=COMMAND_TIMEOUT_MS
    )
    expect(panel.get_by_test_id("reported-applied")).to_have_text("applied")
    expect(panel.locator("input[name=telemetry_interval_s]")).to_have_value("2")
    device = fleet.device(agent.device_id)
    assert device["desired_generation"] == before + 1
    assert device["reported_generation"] == before + 1

    page.get_by_role("link", name="← All devices").click()
    row = page.locator(f'tr[data-device-id="{agent.device_id}"]')
    expect(row.get_by_test_id("config-sync")).to_have_text("in sync")


def test_devices_page_shows_config_sync_and_sends_a_command_to_a_tag(
    sqlite_fleet: Fleet, page: Page
) -> None:
    fleet = sqlite_fleet
    tagged_key = fleet.create_key(tags={"site": "lab"})
    lab = fleet.start_agent(fleet.enroll("lab-1", tagged_key["join_token"]))
    other = fleet.start_agent(fleet.enroll("office-1"))
    sign_in(page, fleet)

    for agent in (lab, other):
        row = page.locator(f'tr[data-device-id="{agent.device_id}"]')
        expect(row.get_by_test_id("status")).to_have_text("online", timeout=ONLINE_TIMEOUT_MS)
        expect(row.get_by_test_id("config-sync")).to_have_text("in sync")

    # A device that is down cannot apply a new desired state: it lags until it comes back.
    other.stop()
    other_row = page.locator(f'tr[data-device-id="{other.device_id}"]')
    expect(other_row.get_by_test_id("status")).to_have_text("offline", timeout=30_000)
    response = fleet.api.put(
        f"/api/v1/devices/{other.device_id}/desired",
        json={"config": {"telemetry_interval_s": 5}},
    )
    assert response.status_code == 200, response.text
    generation = response.json()["generation"]
    # Changing the desired state sends no event of its own: the list shows it once re-read.
    page.reload()
    expect(other_row.get_by_test_id("config-sync")).to_have_text(
        re.compile(rf"^lagging \(g\S+ → g{generation}\)$"), timeout=10_000
    )

    page.get_by_role("button", name="Send to tag…").click()
    dialog = page.get_by_test_id("tag-command-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("input[name=tag]").fill("site=lab")
    dialog.locator("select[name=command-type]").select_option("ping")
    dialog.get_by_role("button", name="Send command").click()
    expect(dialog.get_by_test_id("tag-command-result")).to_have_attribute("data-count", "1")
    page.screenshot(path=str(fleet.tmp / "send-to-tag.png"))
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()

    def lab_ping_succeeded() -> bool:
        response = fleet.api.get(
            "/api/v1/commands", params={"device_id": lab.device_id, "limit": 10}
        )
        response.raise_for_status()
        return any(c["type"] == "ping" and c["status"] == "succeeded" for c in response.json())

    wait_until(lab_ping_succeeded, COMMAND_TIMEOUT_MS / 1000, 0.2, "the tag's ping to succeed")
    open_device_page(page, fleet, lab.device_id)
    expect(latest_command(page, "ping").get_by_test_id("command-status")).to_have_text("succeeded")
