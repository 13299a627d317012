"""The playground page in a real browser (Debian's chromium driven by Playwright) against a real
gateway and orchestrator with the demo model: type a prompt, click, watch the progress, see the image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import tool
from .processes import Daemon, start, wait_healthy

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WATCH_STATUS = """() => {
  window.statuses = [];
  new MutationObserver(() => window.statuses.push(document.getElementById("status").textContent))
    .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Daemon]:
    logs = tmp_path_factory.mktemp("playground")
    daemon = start(
        "t2i_gateway",
        ["--local-orchestrator"],
        logs,
        {"T2I_ORCHESTRATOR_CACHE_DIR": str(model_cache), "T2I_ORCHESTRATOR_STORAGE_DIR": str(logs / "images")},
    )
    try:
        wait_healthy(daemon)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
async def page(gateway: Daemon):  # type: ignore[no-untyped-def]
    chromium = tool("chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1100, "height": 900})
        await page.goto(f"{gateway.url}/")
        yield page
        await browser.close()


async def test_prompt_click_progress_image(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    await page.wait_for_selector("#model option[value='t2i/tiny-sd']", state="attached")
    # The demo model is on offer: the page says that its noise is by design.
    assert await page.is_visible("#demo-note") and "draws coloured noise by design" in await page.text_content("#demo-note")
    await page.fill("#prompt", "a cool cat on the beach")
    await page.fill("#width", "256")
    await page.fill("#height", "256")
    await page.fill("#steps", "30")
    await page.fill("#seed", "42")
    await page.select_option("#model", "t2i/tiny-sd")
    await page.evaluate(WATCH_STATUS)
    await page.click("#generate")
    image = page.locator("#images figure img").first
    await image.wait_for(timeout=60_000)
    await page.wait_for_function("() => document.querySelector('#images img').naturalWidth === 256", timeout=30_000)
    assert await page.text_content("#status") == "Done."
    assert "seed 42" in await page.text_content("#images figcaption")
    src = await image.get_attribute("src")
    assert src and await page.get_attribute("#images figure a", "href") == src  # the thumbnail links to the full image
    statuses = await page.evaluate("window.statuses")
    steps = [s for s in statuses if s.startswith("Step ")]
    assert "Step 30 of 30" in steps and len(steps) >= 3, statuses  # the bar moved through the steps
    assert await page.eval_on_selector("#progress", "p => [p.value, p.max]") == [30, 30]
    screenshot = tmp_path / "playground.png"
    await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_page_has_an_icon_that_a_browser_can_draw(page) -> None:  # type: ignore[no-untyped-def]
    # Headless chromium asks for no favicon, so the page's own icon is drawn here as a tab would.
    size = await page.evaluate("""async () => {
        const image = new Image();
        image.src = document.querySelector("link[rel=icon]").href;
        await image.decode();
        return [image.naturalWidth, image.naturalHeight];
    }""")
    assert size[0] > 0 and size[1] > 0


async def test_errors_are_shown(page) -> None:  # type: ignore[no-untyped-def]
    await page.evaluate("() => { document.getElementById('form').noValidate = true; }")  # let the server judge
    await page.fill("#width", "100")
    await page.click("#generate")
    await page.wait_for_selector("#error:not(:empty)")
    assert "width: Must be a multiple of 8" in await page.text_content("#error")
    assert await page.text_content("#status") == "Failed."


async def test_flagged_images_are_blurred_until_clicked(page) -> None:  # type: ignore[no-untyped-def]
    # The demo model never flags an image, so the page is handed a result event as the gateway sends it.
    await page.evaluate("""() => handle("result", {images: [{url: "/nothing.png", seed: 7, nsfw: true}]})""")
    figure = page.locator("#images figure").first
    assert await figure.get_attribute("class") == "nsfw"
    assert "blur" in await page.eval_on_selector("#images img", "img => getComputedStyle(img).filter")
    await page.click("#images img")
    assert not await figure.get_attribute("class")
    assert "flagged NSFW" in await page.text_content("#images figcaption")
