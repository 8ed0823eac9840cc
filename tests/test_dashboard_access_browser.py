"""The dashboard's access pages in headless Chromium: users, API tokens, the audit log,
integrations, webhooks, security findings, device revocation, and what a viewer is shown.

Everything runs against a real ``edgefleet up`` (SQLite: these tests are about the browser, the
storage is covered elsewhere); secrets shown once are checked against the real API, the
integration bundle is downloaded from the page, and a webhook delivery comes from a real result
published over MQTT to a real HTTP receiver.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.fixtures.browser import sign_in
from tests.fixtures.fleet import Fleet
from tests.test_deployments import Device, make_release
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ADMIN_PAGES = ("Users", "Tokens", "Integrations", "Webhooks", "Audit", "Security")
# From a result published over MQTT to its delivery shown as delivered: ingest, the sender's
# poll (webhook_poll_s, 2 s), one POST, and the delivery page's own re-read (5 s).
DELIVERED_TIMEOUT_MS = 30_000


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def nav(page: Page, name: str) -> None:
    """Go to a top-level page through the main navigation (client-side routing)."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()


def nav_links(page: Page) -> Locator:
    return page.get_by_role("navigation", name="Main").get_by_role("link")


def sign_in_as(page: Page, fleet: Fleet, username: str, password: str) -> None:
    """Sign in as any user and wait for the devices page's live event stream."""
    page.goto(f"{fleet.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("text=Sign in")
    expect(page).to_have_url(f"{fleet.url}/")
    expect(page.get_by_test_id("live-indicator")).to_have_attribute("data-state", "live")


def bearer(fleet: Fleet, secret: str) -> httpx.Client:
    client = fleet.anonymous()
    client.headers["Authorization"] = f"Bearer {secret}"
    return client


def download(page: Page, panel: Locator, filename: str) -> str:
    """Click a download link of ``panel`` and return what the browser saved."""
    with page.expect_download() as info:
        panel.get_by_test_id(f"download-{filename}").click()
    got = info.value
    assert got.suggested_filename == filename
    return Path(got.path()).read_text()


def audit_row(page: Page, action: str, outcome: str | None = None) -> Locator:
    wanted = f'[data-outcome="{outcome}"]' if outcome else ""
    return page.locator(f'tr[data-audit-action="{action}"]{wanted}')


def test_admin_adds_a_viewer_a_token_an_integration_and_a_webhook_and_audits_them(
    sqlite_fleet: Fleet, page: Page, receiver: Receiver
) -> None:
    fleet = sqlite_fleet
    sign_in(page, fleet)
    expect(page.get_by_test_id("whoami")).to_have_attribute("data-role", "admin")
    for name in ADMIN_PAGES:
        expect(
            page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True)
        ).to_be_visible()

    # --- a viewer, with a generated password shown once -----------------------------------
    nav(page, "Users")
    form = page.get_by_test_id("user-form")
    form.locator("input[name=username]").fill("not a name")
    form.get_by_role("button", name="Add user").click()
    expect(form.get_by_test_id("user-error")).to_contain_text("A username is")
    form.locator("input[name=username]").fill("vera")
    form.locator("select[name=role]").select_option("viewer")
    form.get_by_role("button", name="Add user").click()
    shown = page.get_by_test_id("secret-once")
    expect(shown.get_by_test_id("secret-warning")).to_contain_text("you will not see it again")
    password = shown.get_by_test_id("created-password").inner_text().strip()
    assert len(password) >= 12
    row = page.locator('tr[data-username="vera"]')
    expect(row.locator("select[name=user-role]")).to_have_value("viewer")
    with fleet.anonymous() as client:
        access = Fleet.login(client, "vera", password)
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {access}"}).json()
    assert (me["name"], me["role"]) == ("vera", "viewer")
    shown.get_by_role("button", name="I have saved it").click()
    expect(page.get_by_test_id("secret-once")).to_have_count(0)
    assert password not in page.content()
    # A user that exists already: the service's problem detail shows by the form.
    form.locator("input[name=username]").fill("vera")
    form.get_by_role("button", name="Add user").click()
    expect(form.get_by_test_id("user-error")).to_contain_text("vera")

    # --- an API token: secret shown once, works, then revoked from the page ----------------
    nav(page, "Tokens")
    expect(page.get_by_test_id("tokens-empty")).to_be_visible()
    form = page.get_by_test_id("token-form")
    form.locator("input[name=name]").fill("ci-bot")
    form.locator("select[name=role]").select_option("operator")
    form.locator("input[name=tag]").fill("site=lab")
    form.locator("input[name=expires_in]").fill("forever")
    form.get_by_role("button", name="Create token").click()
    expect(form.get_by_test_id("token-error")).to_contain_text("lifetime")
    form.locator("input[name=expires_in]").fill("30d")
    form.get_by_role("button", name="Create token").click()
    shown = page.get_by_test_id("secret-once")
    expect(shown).to_contain_text("you will not see it again")
    secret = shown.get_by_test_id("created-secret").inner_text().strip()
    assert secret.startswith("eft_")
    with bearer(fleet, secret) as client:
        me = client.get("/api/v1/auth/me").json()
        assert (me["kind"], me["role"], me["tag"]) == ("token", "operator", "site=lab")
    token_row = page.locator('tr[data-token-name="ci-bot"]')
    expect(token_row.get_by_test_id("token-state")).to_have_text("active")
    page.reload()
    expect(token_row.get_by_test_id("token-state")).to_have_text("active")
    expect(page.get_by_test_id("secret-once")).to_have_count(0)
    assert secret not in page.content(), "the secret is shown once, at creation"
    token_row.get_by_role("button", name="Revoke…").click()
    dialog = page.get_by_test_id("revoke-token-dialog")
    expect(dialog).to_contain_text("refused (401)")
    dialog.get_by_role("button", name="Revoke token").click()
    expect(dialog).to_be_hidden()
    expect(token_row.get_by_test_id("token-state")).to_have_text("revoked")
    with bearer(fleet, secret) as client:
        assert client.get("/api/v1/auth/me").status_code == 401

    # --- an integration: the bundle is downloaded from the page ----------------------------
    nav(page, "Integrations")
    form = page.get_by_test_id("integration-form")
    form.locator("input[name=name]").fill("erp-reader")
    form.locator("input[name=read-status]").check()
    form.get_by_role("button", name="Create integration").click()
    bundle = page.get_by_test_id("integration-bundle")
    expect(bundle).to_contain_text("you will not see it again")
    command = bundle.get_by_test_id("bundle-mosquitto-sub").inner_text()
    assert command.startswith("mosquitto_sub") and "--key client.key" in command
    key = download(page, bundle, "client.key")
    assert key.startswith("-----BEGIN PRIVATE KEY-----")
    assert download(page, bundle, "client.crt").startswith("-----BEGIN CERTIFICATE-----")
    assert download(page, bundle, "ca.crt").strip() == fleet.home.ca_cert.read_text().strip()
    readme = download(page, bundle, "README.md")
    page.screenshot(path=str(fleet.tmp / "integration-bundle.png"), full_page=True)
    assert command in readme
    assert "results, status (every device)" in readme
    bundle.get_by_role("button", name="I have saved it").click()
    expect(page.get_by_test_id("integration-bundle")).to_have_count(0)
    listed = page.locator('tr[data-integration-name="erp-reader"]')
    expect(listed.get_by_test_id("integration-state")).to_have_text("active")
    assert key.strip() not in page.content()
    # The same name again: the service's 409 detail shows by the form.
    form.locator("input[name=name]").fill("erp-reader")
    form.get_by_role("button", name="Create integration").click()
    expect(form.get_by_test_id("integration-error")).to_contain_text("exists")

    # --- a webhook, and its delivery log once a real result has gone out -------------------
    nav(page, "Webhooks")
    form = page.get_by_test_id("webhook-form")
    form.locator("input[name=name]").fill("erp")
    form.locator("input[name=url]").fill("ftp://example.com/hook")
    form.get_by_role("button", name="Add webhook").click()
    expect(form.get_by_test_id("webhook-error")).to_contain_text("https://")
    form.locator("input[name=url]").fill(receiver.url())
    form.get_by_role("button", name="Add webhook").click()
    shown = page.get_by_test_id("secret-once")
    expect(shown).to_contain_text("you will not see it again")
    assert shown.get_by_test_id("created-secret").inner_text().strip().startswith("whsec_")
    shown.get_by_role("button", name="I have saved it").click()
    hook_row = page.locator('tr[data-webhook-name="erp"]')
    expect(hook_row.get_by_test_id("webhook-state")).to_have_text("enabled")
    hook_row.get_by_test_id("webhook-link").click()
    expect(page.get_by_test_id("webhook-title")).to_have_text("Deliveries of erp")
    expect(page.get_by_test_id("deliveries-empty")).to_be_visible()

    camera = Device(fleet, "camera")
    try:
        message = camera.result(make_release(fleet, "detector", "1.0"), label="cat", confidence=0.9)
        delivery = page.locator("tr[data-delivery-id]").first
        expect(delivery.get_by_test_id("delivery-state")).to_have_text(
            "delivered", timeout=DELIVERED_TIMEOUT_MS
        )
        expect(delivery).to_contain_text(message.message_id)
        expect(delivery.get_by_test_id("delivery-attempts")).to_have_text("1")
        expect(delivery.get_by_test_id("delivery-last")).to_have_text("HTTP 200")
        assert len(receiver.posts()) == 1
    finally:
        camera.close()

    # --- the audit log lists every one of those actions, and filters them ------------------
    nav(page, "Audit")
    for action in (
        "user.create",
        "token.create",
        "token.revoke",
        "integration.create",
        "webhook.create",
    ):
        expect(audit_row(page, action).first).to_be_visible()
    created = audit_row(page, "user.create", "success").first  # newest first; init added admin
    expect(created.get_by_test_id("audit-target")).to_have_text("vera")
    expect(created).to_contain_text("admin")
    # The second "vera" was refused; the attempt is logged too.
    expect(audit_row(page, "user.create", "failed")).to_have_count(1)
    filters = page.get_by_test_id("audit-filters")
    filters.locator("input[name=action]").fill("token.*")
    filters.get_by_role("button", name="Show").click()
    expect(page).to_have_url(f"{fleet.url}/audit?action=token.*")
    expect(page.locator("tr[data-audit-action]")).to_have_count(2)
    expect(audit_row(page, "token.create")).to_have_count(1)
    expect(audit_row(page, "token.revoke")).to_have_count(1)

    # --- security findings: the integration reads every device ------------------------------
    nav(page, "Security")
    finding = page.locator('tr[data-kind="integration-broad"]')
    expect(finding).to_contain_text("integration:erp-reader")
    expect(finding).to_contain_text("every device")
    expect(page.get_by_test_id("findings-summary")).to_contain_text("checked")
    page.screenshot(path=str(fleet.tmp / "security.png"), full_page=True)


def test_a_viewer_sees_no_actions_no_admin_pages_and_a_clear_403_on_a_direct_visit(
    sqlite_fleet: Fleet, page: Page
) -> None:
    fleet = sqlite_fleet
    password = secrets.token_urlsafe(18)
    created = fleet.api.post(
        "/api/v1/users", json={"username": "vera", "role": "viewer", "password": password}
    )
    assert created.status_code == 201, created.text
    camera = Device(fleet, "camera")
    release = make_release(fleet, "detector", "1.0")
    deployment = fleet.api.post(
        "/api/v1/deployments", json={"release_id": release.id, "device_ids": [camera.id]}
    )
    assert deployment.status_code == 201, deployment.text
    try:
        sign_in_as(page, fleet, "vera", password)
        expect(page.get_by_test_id("whoami")).to_have_attribute("data-role", "viewer")
        expect(nav_links(page)).to_have_text(
            ["Devices", "Models", "Deployments", "Results", "Fleet"]
        )
        row = page.locator(f'tr[data-device-id="{camera.id}"]')
        expect(row).to_be_visible()
        expect(page.get_by_role("button", name="Send to tag…")).to_have_count(0)

        # The device page: everything to read, nothing to do.
        row.locator("a").first.click()
        expect(page.get_by_test_id("device-hostname")).to_be_visible()
        panel = page.get_by_test_id("commands-panel")
        expect(panel.get_by_test_id("read-only-note")).to_contain_text(
            "signed in as a viewer: only an operator or above can send commands"
        )
        expect(page.get_by_test_id("command-form")).to_have_count(0)
        expect(page.get_by_test_id("desired-form")).to_have_count(0)
        expect(page.get_by_test_id("device-revoke")).to_have_count(0)
        expect(page.get_by_role("button", name="Send command")).to_have_count(0)

        nav(page, "Models")
        expect(page.locator(f'tr[data-release-id="{release.id}"]')).to_be_visible()
        expect(page.get_by_test_id("deploy-link")).to_have_count(0)
        expect(page.get_by_test_id("upload-form")).to_have_count(0)
        expect(page.get_by_test_id("read-only-note")).to_contain_text("upload or deploy models")

        nav(page, "Deployments")
        page.locator(f'tr[data-deployment-id="{deployment.json()["id"]}"] a').click()
        expect(page.get_by_test_id("deployment-title")).to_have_text("detector 1.0")
        for action in ("pause", "resume", "rollback"):
            expect(page.get_by_test_id(f"deployment-{action}")).to_have_count(0)

        # A direct visit to the deploy form or to an admin page says plainly what is missing.
        page.goto(f"{fleet.url}/models/{release.id}/deploy")
        expect(page.get_by_test_id("read-only-note")).to_contain_text("deploy models")
        expect(page.get_by_test_id("deploy-form")).to_have_count(0)
        for path in ("users", "tokens", "audit", "integrations", "webhooks", "security"):
            page.goto(f"{fleet.url}/{path}")
            alert = page.get_by_role("alert")
            expect(alert.get_by_test_id("forbidden-title")).to_have_text(
                "You do not have access to this page."
            )
            expect(alert.get_by_test_id("forbidden-detail")).to_contain_text(
                "needs the admin role; vera is viewer"
            )
            expect(page.locator("form button[type=submit]:visible")).to_have_count(
                1 if path == "audit" else 0  # the audit log's filter form only
            )
        page.screenshot(path=str(fleet.tmp / "viewer-403.png"), full_page=True)
    finally:
        camera.close()


def test_admin_revokes_a_device_from_its_page_after_confirming(
    sqlite_fleet: Fleet, page: Page
) -> None:
    fleet = sqlite_fleet
    camera = Device(fleet, "camera")
    try:
        sign_in(page, fleet)
        row = page.locator(f'tr[data-device-id="{camera.id}"]')
        row.locator("a").first.click()
        expect(page.get_by_test_id("device-hostname")).to_be_visible()
        expect(page.get_by_test_id("revoked-badge")).to_have_count(0)

        # Cancelling changes nothing.
        page.get_by_test_id("device-revoke").click()
        dialog = page.get_by_test_id("revoke-dialog")
        expect(dialog).to_contain_text("cannot reconnect or enroll again with this identity")
        expect(dialog).to_contain_text("stay")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert fleet.device(camera.id)["revoked_at"] is None

        page.get_by_test_id("device-revoke").click()
        dialog.locator("input[name=reason]").fill("stolen from the lab")
        dialog.get_by_role("button", name="Revoke device").click()
        expect(dialog).to_be_hidden(timeout=20_000)
        header = page.locator(f'header[data-device-id="{camera.id}"]')
        expect(header.get_by_test_id("revoked-badge")).to_have_text("revoked")
        expect(page.get_by_test_id("revoked-note")).to_contain_text("cannot connect")
        expect(page.get_by_test_id("device-revoke")).to_have_count(0)
        assert fleet.device(camera.id)["revoked_at"] is not None
        page.screenshot(path=str(fleet.tmp / "device-revoked.png"))

        # The device list marks it too, and the audit log has the reason.
        page.get_by_role("link", name="← All devices").click()
        expect(row.get_by_test_id("revoked-badge")).to_be_visible()
        nav(page, "Audit")
        event = audit_row(page, "device.revoke")
        expect(event.get_by_test_id("audit-target")).to_have_text(camera.id)
        expect(event).to_contain_text("stolen from the lab")
    finally:
        camera.close()
