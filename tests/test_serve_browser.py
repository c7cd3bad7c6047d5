"""The web page in a real headless Chromium: `imgsim serve` runs as its own process on 127.0.0.1, the
page uploads a photo (picked, dropped, pasted), the result thumbnails must appear and load, clicking
one searches by it, and the page fits a phone's screen. Screenshots are saved in the test's folder
(and copied to $IMGSIM_SCREENSHOTS when set)."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver); "
                "the browser test needs it", allow_module_level=True)
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")

from imgsim import Index  # noqa: E402

from .conftest import TINY_MODEL  # noqa: E402

CLI = Path(__file__).with_name("tiny_model.py")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, photos, tiny_model_dir):
    index = tmp_path / "web"
    with Index.create(index, model=TINY_MODEL) as created:
        created.add(photos)
    port = free_port()
    env = {**os.environ, "IMGSIM_MODELS": str(tiny_model_dir)}
    env.pop("IMGSIM_TOKEN", None)
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, str(CLI), "serve", "--index", str(index), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"imgsim serve did not start: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 1000
    if os.environ.get("IMGSIM_SCREENSHOTS"):
        target = Path(os.environ["IMGSIM_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def wait_until(page, script: str, seconds: float = 20.0):
    """Poll a JavaScript expression (the page's CSP forbids the eval that Playwright's
    wait_for_function uses)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = page.evaluate(f"() => {script}")
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def all_thumbnails_loaded(page) -> int:
    """Scroll every result into view (they load lazily) and check each image decoded; return the count."""
    cards = page.locator("#results .card")
    count = cards.count()
    assert count > 0
    for i in range(count):
        cards.nth(i).scroll_into_view_if_needed()
    wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    return count


def test_search_by_upload_then_by_clicking_a_result(server, browser, photos, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server + "/")
    wait_until(page, "document.getElementById('about').textContent.includes('images')")
    assert page.inner_text("#about").startswith(f"{len(list(photos.glob('*.jpg')))} images")

    page.set_input_files("#file", str(photos / "coffee.jpg"))
    page.wait_for_selector("#results .card")
    assert all_thumbnails_loaded(page) == min(20, len(list(photos.glob("*.jpg"))))  # the page asks for 20
    first = page.locator("#results .card").first
    assert first.locator(".name").inner_text() == "coffee.jpg"
    assert first.locator(".score").inner_text() == "1.000"
    assert "results for coffee.jpg" in page.inner_text("#status")
    save_screenshot(page, tmp_path, "serve-search.png")

    second = page.locator("#results .card").nth(1)
    clicked = second.locator(".name").inner_text()
    second.locator("button").click()
    wait_until(page, f"document.getElementById('status').textContent.includes('for {clicked}')")
    all_thumbnails_loaded(page)
    names = page.locator("#results .card .name").all_inner_texts()
    assert clicked not in names  # the image itself is left out of "similar"
    assert page.get_attribute("#query-preview", "src").startswith("/thumbs/")

    page.click("#tab-dupes")
    wait_until(page, "/\\d+ groups of duplicates/.test(document.getElementById('dupes-status').textContent)")
    wait_until(page, "[...document.querySelectorAll('#groups img')].every(i => i.complete && i.naturalWidth > 0)")
    assert errors == [], errors


def test_drop_and_paste(server, browser, photos):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(server + "/")
    data = base64.b64encode((photos / "rocket.jpg").read_bytes()).decode()
    make_transfer = """(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'rocket.jpg', {type: 'image/jpeg'}));
        return transfer;
    }"""
    page.evaluate(f"""(b64) => {{
        const transfer = ({make_transfer})(b64);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: transfer, bubbles: true, cancelable: true}}));
    }}""", data)
    wait_until(page, "document.getElementById('status').textContent.includes('results for rocket.jpg')")
    assert page.locator("#results .card .name").first.inner_text() == "rocket.jpg"
    page.evaluate(f"""(b64) => {{
        const transfer = ({make_transfer})(b64);
        document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: transfer, bubbles: true, cancelable: true}}));
    }}""", base64.b64encode((photos / "chelsea.jpg").read_bytes()).decode())
    wait_until(page, "document.querySelector('#results .card .name')?.textContent === 'chelsea.jpg'")
    all_thumbnails_loaded(page)


def test_the_page_fits_a_phone(server, browser, photos, tmp_path):
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True)
    page = phone.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(photos / "astronaut.jpg"))
    page.wait_for_selector("#results .card")
    all_thumbnails_loaded(page)
    page.evaluate("() => window.scrollTo(0, 0)")
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways on a phone: {widths}"
    columns = page.evaluate("() => getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    save_screenshot(page, tmp_path, "serve-phone.png")
    phone.close()
