"""The playground page in headless Chromium (the distribution's), through the whole flow: key, streamed enhancement,
style, size, reference image, generation, live status, the image, credits and recent tasks; an end user's token with
its daily check-in; and the canvas panel: a canvas grown in four directions, a failing step's report, and a revert."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import Browser, Page, expect, sync_playwright

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
    # The daily check-in is an end user's: a tenant key does not see it.
    expect(page.locator("#check-in")).to_be_hidden()

    page.fill("#prompt", "a lighthouse on a cliff")
    page.select_option("#style", "watercolor")
    page.click("#enhance")
    expect(page.locator("#prompt")).to_have_value(re.compile("watercolor painting"))
    enhanced = page.input_value("#prompt")
    assert enhanced.startswith("a lighthouse on a cliff,")

    page.select_option("#size", "16:9")
    page.set_input_files("#reference", str(reference))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("running")
    expect(page.locator("#status")).to_have_text("completed", timeout=20_000)
    # The status came from the task's event stream, opened once, not from polling the task.
    followed = [url for url in requested if "/api/images/tasks/" in url and "/image?" not in url]
    assert len(followed) == 1 and followed[0].endswith("/events"), followed
    expect(page.locator("#image")).to_be_visible()
    size = page.locator("#image").evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert abs(size[0] / size[1] - 16 / 9) < 0.05
    expect(page.locator("#credits")).to_have_text("99")
    # The spending chart: 30 days, today's bar the only one standing, the total under the title.
    today = datetime.now(UTC).date().isoformat()
    expect(page.locator("#spending-total")).to_have_text("1 credits (1 spent, 0 refunded)")
    expect(page.locator("#spending-chart rect")).to_have_count(30)
    bar = page.locator(f'#spending-chart rect[data-day="{today}"]')
    assert bar.get_attribute("data-net") == "1" and float(bar.get_attribute("height") or 0) > 80
    assert page.locator('#spending-chart rect[data-net="0"]').count() == 29
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
    # The spending report is the tenant's: the panel stays hidden for an end user.
    expect(page.locator("#spending")).to_be_hidden()
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


def gradient_png(path: Path, width: int, height: int) -> None:
    """A picture with a different colour at every pixel, so a blank or misplaced one shows."""
    Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
            Image.new("L", (width, height), 90),
        ),
    ).save(path, format="PNG")


def shown_canvas(page: Page) -> tuple[int, int]:
    """The natural size of the picture the page shows, once its size label names it."""
    size = page.locator("#canvas-image").evaluate("image => [image.naturalWidth, image.naturalHeight]")
    return int(size[0]), int(size[1])


def expect_canvas(page: Page, width: int, height: int) -> None:
    expect(page.locator("#canvas-size")).to_have_text(f"{width} \N{MULTIPLICATION SIGN} {height}", timeout=20_000)
    assert shown_canvas(page) == (width, height)


def step_done(page: Page, n: int, status: str) -> None:
    expect(page.locator("#step-status")).to_have_text(f"Step {n}: {status}", timeout=20_000)


def test_the_playground_grows_a_canvas_in_four_directions(
    browser: Browser, service: Service, tenant: Tenant, upstream: Upstream, tmp_path: Path
) -> None:
    first = tmp_path / "first.png"
    gradient_png(first, 160, 120)
    page = browser.new_page()
    page.goto(service.base_url + "/")
    page.fill("#key", tenant.api_key)
    page.click("#connect")
    expect(page.locator("#credits")).to_have_text("100")

    page.set_input_files("#canvas-file", str(first))
    page.click("#canvas-upload")
    expect_canvas(page, 160, 120)
    canvas_id = page.inner_text("#canvas-id")
    assert tenant.client.get(f"/api/canvases/{canvas_id}").json()["origin"] == "upload"

    # A bad field is refused before anything is paid, and the page names the field.
    page.fill("#overlap-px", "500")
    page.click("#step-right")
    expect(page.locator("#canvas-error")).to_contain_text("422")
    expect(page.locator("#canvas-error")).to_contain_text("field overlap_px")
    page.fill("#overlap-px", "24")

    expected = [(200, 120), (240, 120), (240, 150), (240, 180)]
    for n, (arrow, length) in enumerate((("right", 40), ("left", 40), ("up", 30), ("down", 30)), start=1):
        page.fill("#extension-px", str(length))
        page.click(f"#step-{arrow}")
        step_done(page, n, "committed")
        expect_canvas(page, *expected[n - 1])
    assert page.inner_text("#canvas-error") == ""
    canvas = tenant.client.get(f"/api/canvases/{canvas_id}").json()
    assert (canvas["width"], canvas["height"], canvas["head"]) == (240, 180, 4)
    assert page.locator("#canvas-image").get_attribute("data-sha256") == canvas["image"]["sha256"]

    rows = page.locator("#canvas-steps tr[data-step]")
    expect(rows).to_have_count(5)
    thumbs = page.locator("#canvas-steps img.thumb")
    expect(thumbs.locator("visible=true")).to_have_count(4)
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every((image) => image.naturalWidth)")
    assert thumbs.evaluate_all("images => images.map((image) => [image.naturalWidth, image.naturalHeight])") == [
        list(size) for size in expected
    ]
    for n, (arrow, length) in enumerate((("right", 40), ("left", 40), ("up", 30), ("down", 30)), start=1):
        row = page.locator(f"#canvas-steps tr[data-step='{n}']")
        expect(row.locator("td").nth(2)).to_have_text("committed")
        expect(row.locator("td").nth(3)).to_contain_text(f"{arrow} +{length}px")

    # The screenshot shows the grown canvas, pixel for pixel, where the page draws it.
    screenshot = tmp_path / "playground-canvas.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    box = page.locator("#canvas-image").evaluate(
        "image => { const r = image.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY]; }"
    )
    left, top = round(box[0]), round(box[1])
    drawn = Image.open(screenshot).convert("RGB").crop((left, top, left + 240, top + 180))
    current = Image.open(io.BytesIO(tenant.client.get(f"/api/canvases/{canvas_id}/image").content)).convert("RGB")
    assert current.size == (240, 180)
    assert max(ImageStat.Stat(ImageChops.difference(drawn, current)).mean) < 4
    assert len(drawn.getcolors(240 * 180) or []) > 1000

    # A step whose model repaints the band it must keep fails; its report shows and the canvas stays as it was.
    marker = "playground-repaints-the-seam"
    upstream.faults({"fault": "repaint_kept", "match": marker})
    page.fill("#step-prompt", marker)
    page.fill("#immutable-px", "16")
    page.click("#step-right")
    step_done(page, 5, "failed")
    expect(page.locator("#canvas-error")).to_contain_text("immutable_violation")
    report = page.locator("#canvas-steps tr.failure pre.report")
    expect(report).to_contain_text("Step 5 of canvas")
    expect(report).to_contain_text("immutable_violation")
    expect(report).to_contain_text("refunded: 1")
    expect(page.locator("#canvas-steps tr[data-step='5'] td").nth(2)).to_have_text("failed (immutable_violation)")
    expect_canvas(page, 240, 180)
    assert tenant.client.get(f"/api/canvases/{canvas_id}").json()["head"] == 4
    expect(page.locator("#credits")).to_have_text("96")

    page.click("#canvas-steps tr[data-step='2'] button.revert")
    expect_canvas(page, 240, 120)
    expect(page.locator("#canvas-head")).to_have_text("2")
    reverted = tenant.client.get(f"/api/canvases/{canvas_id}").json()
    assert (reverted["width"], reverted["height"], reverted["head"]) == (240, 120, 2)
    assert page.locator("#canvas-image").get_attribute("data-sha256") == reverted["image"]["sha256"]
    expect(page.locator("#canvas-steps tr[data-step='4'] td").nth(2)).to_have_text("reverted")
    assert page.inner_text("#canvas-error") == ""

    # While a step runs (held by a slow upstream until it is cancelled), a second step is refused by the service and
    # a revert by the page.
    upstream.faults()
    upstream.settings(latency=60)
    page.fill("#step-prompt", "more of the same")
    page.fill("#immutable-px", "0")
    page.click("#step-up")
    expect(page.locator("#step-status")).to_have_text("Step 6: running", timeout=20_000)
    page.click("#step-left")
    expect(page.locator("#canvas-error")).to_contain_text("(409, step_running)")
    page.click("#canvas-steps tr[data-step='1'] button.revert")
    expect(page.locator("#canvas-error")).to_have_text("Step 6 is still running; revert once it has ended.")
    held = tenant.client.get(f"/api/canvases/{canvas_id}/steps/6").json()
    assert tenant.client.post(f"/api/images/tasks/{held['task_id']}/cancel").status_code == 200
    step_done(page, 6, "cancelled")
    expect(page.locator("#canvas-error")).to_have_text("Step 6 was cancelled. The canvas is as it was.")
    expect_canvas(page, 240, 120)
    assert tenant.client.get(f"/api/canvases/{canvas_id}").json()["head"] == 2
    page.close()


def test_the_playground_starts_a_canvas_from_a_prompt(browser: Browser, service: Service, tenant: Tenant) -> None:
    page = browser.new_page()
    page.goto(service.base_url + "/")
    page.fill("#key", tenant.api_key)
    page.click("#connect")
    expect(page.locator("#credits")).to_have_text("100")
    page.fill("#canvas-prompt", "a harbour town at noon")
    page.click("#canvas-generate")
    step_done(page, 0, "committed")
    expect(page.locator("#canvas-status")).to_have_text("ready")
    canvas = tenant.client.get(f"/api/canvases/{page.inner_text('#canvas-id')}").json()
    assert (canvas["origin"], canvas["head"]) == ("prompt", 0)
    expect_canvas(page, canvas["width"], canvas["height"])
    assert page.locator("#canvas-image").get_attribute("data-sha256") == canvas["image"]["sha256"]
    first = page.locator("#canvas-steps tr[data-step]")
    expect(first).to_have_count(1)
    expect(first.locator("td").nth(2)).to_have_text("committed")
    expect(first.locator("img.thumb")).to_be_visible()
    expect(page.locator("#credits")).to_have_text("99")
    assert page.inner_text("#canvas-error") == ""
    page.close()


def test_the_playground_shows_a_step_it_cannot_pay_for(browser: Browser, service: Service, tmp_path: Path) -> None:
    tenant = service.new_tenant(credits=0)
    first = tmp_path / "first.png"
    gradient_png(first, 64, 48)
    page = browser.new_page()
    page.goto(service.base_url + "/")
    page.fill("#key", tenant.api_key)
    page.click("#connect")
    expect(page.locator("#credits")).to_have_text("0")
    page.set_input_files("#canvas-file", str(first))
    page.click("#canvas-upload")
    expect_canvas(page, 64, 48)
    page.fill("#extension-px", "16")
    page.click("#step-down")
    expect(page.locator("#canvas-error")).to_contain_text("(402, insufficient_credits)")
    canvas = tenant.client.get(f"/api/canvases/{page.inner_text('#canvas-id')}").json()
    assert (canvas["width"], canvas["height"], canvas["steps"]) == (64, 48, 0)
    expect(page.locator("#canvas-steps tr[data-step]")).to_have_count(1)
    page.close()
