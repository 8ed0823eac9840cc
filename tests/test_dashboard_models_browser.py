"""The dashboard's model journey in headless Chromium: upload, deploy, watch it run, see results.

A real ONNX classifier (built by ``tests/fixtures/models.py``) is uploaded through the Models
page, deployed to a real enrolled agent after the compatibility preview, followed live on the
deployment page until the device runs it, then asked for an inference with an ``infer``
command; its result shows on the Results page (summary, charts, table) and on the device page.

Run alone with this file's path; it needs the built dashboard (``make setup``), Debian's
chromium and onnxruntime, like the other browser tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.fixtures.browser import sign_in
from tests.fixtures.fleet import Fleet
from tests.fixtures.models import CIFAR10_LABELS, build_onnx_classifier, write_labels

# The whole journey (agent start, install, worker load, two inferences) outlasts the default
# per-test timeout on a loaded two-core machine.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(400)]

MODEL = "cifar-classifier"
VERSION = "1.0.0"
ONLINE_TIMEOUT_MS = 20_000
# From confirming a deployment to the device running the model: a rollout tick, the desired
# state over MQTT, signing keys and URLs over HTTPS, download, verify, install, a worker
# process that imports onnxruntime and loads the model, a health check, a report.
RUNNING_TIMEOUT_MS = 90_000
# From sending an infer command to its result on screen: the command round trip, one
# inference, the result over MQTT, ingest, SSE.
RESULT_TIMEOUT_MS = 30_000
# Throttle the browser's uploads so the progress bar is seen moving (bytes per second).
UPLOAD_THROTTLE_BPS = 40_000


def nav(page: Page, name: str) -> None:
    """Go to a top-level page through the main navigation (client-side routing)."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()


def throttle_uploads(page: Page, bytes_per_second: int) -> None:
    """Make this page's uploads slow through the DevTools protocol (downloads stay fast)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": bytes_per_second,
        },
    )


def upload_form(page: Page) -> Locator:
    return page.get_by_test_id("upload-form")


def release_row(page: Page, name: str, version: str) -> Locator:
    return page.locator(f'tr[data-model-name="{name}"][data-version="{version}"]')


def image_input() -> str:
    """One 3x32x32 image as the ``infer`` command's JSON input (the agent adds the batch)."""
    return json.dumps([[[0.5] * 32] * 32] * 3, separators=(",", ":"))


def send_infer(page: Page, model: str, text: str) -> None:
    """Send an ``infer`` command from the device page's command form."""
    form = page.get_by_test_id("command-form")
    form.locator("select[name=command-type]").select_option("infer")
    for key, value in (("model", model), ("input", text)):
        form.get_by_role("button", name="Add parameter").click()
        form.locator("input[name=param-key]").last.fill(key)
        form.locator("input[name=param-value]").last.fill(value)
    form.get_by_role("button", name="Send command").click()
    expect(form.get_by_test_id("command-error")).to_have_count(0)


def test_operator_uploads_an_onnx_model_deploys_it_and_sees_its_results_live(
    sqlite_fleet: Fleet, page: Page, tmp_path: Path
) -> None:
    fleet = sqlite_fleet
    agent = fleet.start_agent(fleet.enroll("edge-cam-1"))
    # Enrolled but never started: no telemetry, so the preview must say it cannot take the model.
    silent_id = json.loads((fleet.enroll("edge-cam-off") / "device.json").read_text())["device_id"]
    weights = build_onnx_classifier(tmp_path / "model" / "classifier.onnx")
    labels = write_labels(tmp_path / "model" / "labels.txt")

    sign_in(page, fleet)
    row = page.locator(f'tr[data-device-id="{agent.device_id}"]')
    expect(row.get_by_test_id("status")).to_have_text("online", timeout=ONLINE_TIMEOUT_MS)

    # --- upload -----------------------------------------------------------------------------
    nav(page, "Models")
    expect(page.get_by_test_id("models-empty")).to_be_visible()
    form = upload_form(page)
    form.locator("input[name=weights]").set_input_files(weights)
    # The runtime follows the file's extension, the name its stem; a name must fit a topic level.
    expect(form.locator("select[name=runtime]")).to_have_value("onnx")
    expect(form.locator("input[name=name]")).to_have_value("classifier")
    form.locator("input[name=name]").fill("Not A Valid Name")
    form.locator("input[name=version]").fill(VERSION)
    form.get_by_role("button", name="Upload model").click()
    expect(form.get_by_test_id("upload-error")).to_contain_text("lowercase")

    form.locator("input[name=name]").fill(MODEL)
    form.locator("input[name=labels]").set_input_files(labels)
    form.locator("input[name=expires_in_days]").fill("30")
    throttle_uploads(page, UPLOAD_THROTTLE_BPS)
    form.get_by_role("button", name="Upload model").click()
    progress = form.get_by_test_id("upload-progress")
    expect(progress).to_be_visible()
    expect(progress.get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", re.compile(r"^[1-9]\d*$"), timeout=10_000
    )
    throttle_uploads(page, -1)
    expect(form.get_by_test_id("upload-result")).to_contain_text(
        f"Uploaded {MODEL} {VERSION} as release 1", timeout=30_000
    )
    expect(progress).to_have_count(0)
    listed = release_row(page, MODEL, VERSION)
    expect(listed.get_by_test_id("model-runtime")).to_have_text("onnx")
    expect(listed.get_by_test_id("model-release")).to_have_text("1")
    expect(listed.get_by_test_id("model-encrypted")).to_have_text("no")
    page.screenshot(path=str(fleet.tmp / "models.png"), full_page=True)

    # A version the service refuses (no spaces allowed): its problem JSON shows by the form.
    form.locator("input[name=weights]").set_input_files(weights)
    form.locator("input[name=name]").fill(MODEL)
    form.locator("input[name=version]").fill("1.1 beta")
    form.get_by_role("button", name="Upload model").click()
    expect(form.get_by_test_id("upload-error")).to_contain_text(
        "version '1.1 beta' is invalid", timeout=10_000
    )
    expect(page.locator(f'tr[data-model-name="{MODEL}"]')).to_have_count(1)

    # --- deploy: preview first, then confirm ------------------------------------------------
    listed.get_by_test_id("deploy-link").click()
    expect(page.get_by_test_id("deploy-title")).to_have_text(f"Deploy {MODEL} {VERSION}")
    deploy = page.get_by_test_id("deploy-form")
    confirm = deploy.get_by_test_id("deploy-confirm")
    expect(confirm).to_be_disabled()
    picker = deploy.get_by_test_id("device-picker")
    picker.locator(f'li[data-device-id="{agent.device_id}"] input[type=checkbox]').check()
    picker.locator(f'li[data-device-id="{silent_id}"] input[type=checkbox]').check()
    deploy.get_by_role("button", name="Check compatibility").click()
    compatible = deploy.get_by_test_id("preview-compatible")
    incompatible = deploy.get_by_test_id("preview-incompatible")
    expect(compatible).to_have_attribute("data-count", "1")
    expect(compatible.locator(f'li[data-device-id="{agent.device_id}"]')).to_be_visible()
    expect(incompatible).to_have_attribute("data-count", "1")
    expect(
        incompatible.locator(f'li[data-device-id="{silent_id}"]').get_by_test_id(
            "incompatible-reasons"
        )
    ).to_contain_text("no telemetry")
    page.screenshot(path=str(fleet.tmp / "deploy-preview.png"), full_page=True)

    # Editing the plan invalidates the preview until it is checked again.
    deploy.locator("input[name=batch_size]").fill("2")
    expect(deploy.get_by_test_id("preview-stale")).to_be_visible()
    expect(confirm).to_be_disabled()
    deploy.locator("input[name=batch_size]").fill("1")
    expect(confirm).to_have_text("Deploy to 1 device")
    confirm.click()

    # --- follow the rollout live -------------------------------------------------------------
    expect(page).to_have_url(re.compile(rf"{re.escape(fleet.url)}/deployments/[\w-]+$"))
    expect(page.get_by_test_id("deployment-title")).to_have_text(f"{MODEL} {VERSION}")
    targets = page.get_by_test_id("targets-table")
    target = targets.locator(f'tr[data-device-id="{agent.device_id}"]')
    expect(target.get_by_test_id("target-state")).to_have_text(
        "running", timeout=RUNNING_TIMEOUT_MS
    )
    expect(target.get_by_test_id("model-phase")).to_have_text("running")
    skipped = targets.locator(f'tr[data-device-id="{silent_id}"]')
    expect(skipped.get_by_test_id("target-state")).to_have_text("incompatible")
    expect(page.get_by_test_id("deployment-state")).to_have_text(
        "completed", timeout=RUNNING_TIMEOUT_MS
    )
    # A finished rollout can no longer be paused or resumed, only rolled back.
    expect(page.get_by_test_id("deployment-pause")).to_be_disabled()
    expect(page.get_by_test_id("deployment-resume")).to_be_disabled()
    expect(page.get_by_test_id("deployment-rollback")).to_be_enabled()
    page.screenshot(path=str(fleet.tmp / "deployment.png"), full_page=True)

    nav(page, "Deployments")
    expect(page.locator("tr[data-deployment-id]").first).to_have_attribute(
        "data-state", "completed"
    )

    # --- the device page: its model, then an inference ----------------------------------------
    nav(page, "Devices")
    page.locator(f'tr[data-device-id="{agent.device_id}"] a').first.click()
    expect(page).to_have_url(f"{fleet.url}/devices/{agent.device_id}")
    model_row = page.get_by_test_id("device-models-table").locator(f'tr[data-model="{MODEL}"]')
    expect(model_row.get_by_test_id("model-phase")).to_have_text("running")
    expect(model_row.get_by_test_id("active-version")).to_contain_text(VERSION)
    expect(model_row.get_by_test_id("model-healthy")).to_have_text("healthy")
    expect(model_row.get_by_test_id("worker-restarts")).to_have_text("0")

    send_infer(page, MODEL, image_input())
    infer = page.locator('tr[data-command-id][data-command-type="infer"]').first
    expect(infer.get_by_test_id("command-status")).to_have_text(
        "succeeded", timeout=RESULT_TIMEOUT_MS
    )
    device_results = page.get_by_test_id("device-results-panel")
    result = device_results.get_by_test_id("result-row").first
    expect(result).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(result.get_by_test_id("result-outcome")).to_contain_text(
        re.compile("|".join(CIFAR10_LABELS))
    )
    expect(device_results.get_by_test_id("chart-latency")).not_to_have_attribute("data-points", "0")
    page.screenshot(path=str(fleet.tmp / "device-models.png"), full_page=True)

    # --- the results page: summary, charts and table -----------------------------------------
    nav(page, "Results")
    page.select_option("select[name=results-model]", MODEL)
    expect(page).to_have_url(re.compile(rf"/results\?model={MODEL}$"))
    summary = page.get_by_test_id("result-summary").locator(f'tr[data-version="{VERSION}"]')
    expect(summary.get_by_test_id("summary-count")).not_to_have_text("0")
    expect(summary.get_by_test_id("summary-error-rate")).to_have_text("0.0%")
    expect(summary.get_by_test_id("summary-p95")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
    expect(summary.get_by_test_id("summary-confidence")).to_have_text(re.compile(r"^\d+\.\d%$"))
    expect(page.get_by_test_id("chart-latency")).not_to_have_attribute("data-points", "0")
    expect(page.get_by_test_id("chart-confidence")).not_to_have_attribute("data-points", "0")
    rows = page.get_by_test_id("results-table").get_by_test_id("result-row")
    first = rows.first
    expect(first).to_have_attribute("data-device-id", agent.device_id)
    expect(first).to_have_attribute("data-version", VERSION)
    expect(first.get_by_test_id("result-outcome")).to_contain_text(
        re.compile("|".join(CIFAR10_LABELS))
    )
    before = rows.count()

    # A second inference arrives on the open page over SSE, without a reload.
    fleet_infer(fleet, agent.device_id, MODEL, image_input())
    expect(rows).to_have_count(before + 1, timeout=RESULT_TIMEOUT_MS)
    page.screenshot(path=str(fleet.tmp / "results.png"), full_page=True)

    # --- roll the deployment back from its page ------------------------------------------------
    nav(page, "Deployments")
    page.locator("tr[data-deployment-id] a").first.click()
    page.get_by_test_id("deployment-rollback").click()
    expect(page.get_by_test_id("deployment-state")).to_have_text("rolled_back")
    for action in ("pause", "resume", "rollback"):
        expect(page.get_by_test_id(f"deployment-{action}")).to_be_disabled()
    expect(target.get_by_test_id("target-state")).to_have_text("rolled_back")


def fleet_infer(fleet: Fleet, device_id: str, model: str, text: str) -> None:
    """Send an ``infer`` command over REST, as a script would."""
    response = fleet.api.post(
        f"/api/v1/devices/{device_id}/commands",
        json={"type": "infer", "params": {"model": model, "input": text}},
    )
    assert response.status_code in (200, 201, 202), response.text
