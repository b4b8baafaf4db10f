"""The playground page in headless Chromium (the distribution's), through the whole flow: key, streamed enhancement,
style, size, reference image, generation, live status, the image, credits and recent tasks; and an end user's
token with its daily check-in."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, expect, sync_playwright

from tests.conftest import Service, Tenant, Upstream

CHROMIUM = Path("/usr/bin/chromium")
QUIET = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=QUIET)
        yield launched
        launched.close()


def test_the_playground_runs_the_whole_flow(
    browser: Browser, service: Service, tenant: Tenant, upstream: Upstream, tmp_path: Path
) -> None:
    reference = tmp_path / "reference.png"
    Image.new("RGB", (240, 160), (20, 110, 90)).save(reference, format="PNG")
    upstream.settings(latency=1.5, token_delay=0.02)
    page = browser.new_page()
    page.goto(service.base_url + "/")
    expect(page).to_have_title("imagegen playground")

    page.fill("#key", tenant.api_key)
    page.click("#connect")
    expect(page.locator("#credits")).to_have_text("100")
    expect(page.locator("#style option")).to_have_count(7)

    page.fill("#prompt", "a lighthouse on a cliff")
    page.select_option("#style", "watercolor")
    page.click("#enhance")
    expect(page.locator("#prompt")).to_have_value(re.compile("watercolor painting"))
    enhanced = page.input_value("#prompt")
    assert enhanced.startswith("a lighthouse on a cliff,")

    page.select_option("#size", "16:9")
    page.set_input_files("#reference", str(reference))
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("running")
    expect(page.locator("#status")).to_have_text("completed", timeout=20_000)
    expect(page.locator("#image")).to_be_visible()
    size = page.locator("#image").evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert abs(size[0] / size[1] - 16 / 9) < 0.05
    expect(page.locator("#credits")).to_have_text("99")
    expect(page.locator("#tasks tr")).to_have_count(1)
    expect(page.locator("#tasks tr td").nth(1)).to_have_text("completed")
    assert page.locator("#error").inner_text() == ""

    task = tenant.client.get("/api/images/tasks").json()["items"][0]
    assert (task["mode"], task["style"], task["size"], task["prompt"]) == ("image", "watercolor", "16:9", enhanced)
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert Image.open(io.BytesIO((tmp_path / "playground.png").read_bytes())).width > 0
    page.close()


def test_the_playground_shows_problems(browser: Browser, service: Service) -> None:
    page = browser.new_page()
    page.goto(service.base_url + "/")
    page.fill("#key", "igk_000000000000.not-a-real-key-not-a-real-key-not-a-real-key-")
    page.click("#connect")
    expect(page.locator("#error")).to_contain_text("401")
    page.close()


def test_the_playground_runs_in_end_user_mode(
    browser: Browser, service: Service, tenant: Tenant, upstream: Upstream, tmp_path: Path
) -> None:
    minted = tenant.client.post("/api/end-user-tokens", json={"user": "browser-user-1"})
    assert minted.status_code == 201, minted.text
    upstream.settings(latency=0.3)
    page = browser.new_page()
    page.goto(service.base_url + "/")
    page.fill("#key", minted.json()["token"])
    page.click("#connect")
    expect(page.locator("#credits-label")).to_have_text("Allowance")
    expect(page.locator("#credits")).to_have_text("0")
    expect(page.locator("#check-in")).to_be_visible()
    page.click("#check-in")
    expect(page.locator("#check-in-result")).to_have_text("+10 credits")
    expect(page.locator("#credits")).to_have_text("10")
    page.click("#check-in")
    expect(page.locator("#check-in-result")).to_have_text("Already checked in today")

    page.fill("#prompt", "a paper boat on a puddle")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("completed", timeout=20_000)
    expect(page.locator("#image")).to_be_visible()
    expect(page.locator("#credits")).to_have_text("9")
    expect(page.locator("#tasks tr")).to_have_count(1)
    assert page.locator("#error").inner_text() == ""
    page.screenshot(path=str(tmp_path / "playground-end-user.png"), full_page=True)
    page.close()
