"""Drive `dalle2-jax serve` in Debian's headless Chromium (selenium): used by tests/test_serve.py,
and run as a script it takes the screenshots in docs/ (`python tests/webui_browser.py --help`)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(model: str, log_path: Path, startup_timeout: float = 180.0, extra_env: dict | None = None):
    """`dalle2-jax serve --model MODEL` on a free 127.0.0.1 port; yields (base URL, log path)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_TEMP_DIR": str(log_path.parent / "gradio"), **(extra_env or {})}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "dalle2_jax.cli", "serve", "--model", str(model),
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"dalle2-jax serve exited ({server.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dalle2-jax serve not up after {startup_timeout} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def chromium(window=(1280, 1000)):
    """A headless Chromium with a fresh profile, driven by chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """Poll `condition()` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the page is still rendering: elements come and go
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(interval)


def element(driver, css: str, timeout: float = 60.0):
    from selenium.webdriver.common.by import By

    return wait_for(lambda: driver.find_element(By.CSS_SELECTOR, css), timeout, css)


def set_text(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = element(driver, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def open_tab(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = wait_for(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                if b.text.strip() == label], 30, f"the tab {label!r}")
    buttons[0].click()


def upload(driver, css: str, path) -> None:
    """Put a file into the upload input of the component `css` and wait for its preview."""
    from selenium.webdriver.common.by import By

    element(driver, f"{css} input[type=file]").send_keys(str(path))
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"{css} img, {css} canvas"), 30, f"the upload in {css}")


def run_and_wait(driver, tab: str, timeout: float = 300.0) -> str:
    """Press the tab's run button and wait for the status line of this run (the server numbers
    its requests; progress text shows over the status meanwhile); returns the status text."""
    before = element(driver, f"#{tab}-status").text.strip()
    before = before.splitlines()[-1] if before else ""
    element(driver, f"#{tab}-run").click()

    def finished():
        text = element(driver, f"#{tab}-status").text.strip()
        last = text.splitlines()[-1] if text else ""
        done = re.search(r"\(request \d+\)", last) and not re.search(r"\d+(\.\d+)?%", text)
        return last if done and last != before else None

    return wait_for(finished, timeout, f"the {tab} status after pressing run (was {before!r})")


def gallery_images(driver, tab: str, count: int, timeout: float = 30.0) -> list[np.ndarray]:
    """Download the `count` images the tab's gallery shows (their PNG files, as the browser has them)."""
    from selenium.webdriver.common.by import By

    def sources():
        srcs = [img.get_attribute("src") for img in
                driver.find_elements(By.CSS_SELECTOR, f"#{tab}-gallery .thumbnail-item img, "
                                                      f"#{tab}-gallery .grid-container img")]
        srcs = list(dict.fromkeys(s for s in srcs if s))
        return srcs if len(srcs) >= count else None

    images = []
    for src in wait_for(sources, timeout, f"{count} images in #{tab}-gallery")[:count]:
        with urllib.request.urlopen(src, timeout=30) as response:
            data = response.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{src} is not a PNG"
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


def resources_off_host(driver, base_url: str) -> list[str]:
    """Every resource the page loaded from anywhere but the server."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [name for name in names + [driver.current_url]
            if not name.startswith(base_url.rstrip("/")) and not name.startswith(("data:", "blob:"))]


def draw_rectangle(driver, css: str, half_width: int = 30, half_height: int = 40) -> None:
    """Paint a filled rectangle with the brush, centred on the editor's canvas (where the image
    is shown), in strokes of small steps as a hand would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"{css} button[aria-label=Brush]").click()
    canvas = max(driver.find_elements(By.CSS_SELECTOR, f"{css} canvas"),
                 key=lambda c: c.size["width"] * c.size["height"])
    for dy in range(-half_height, half_height + 1, 6):
        actions = ActionChains(driver).move_to_element_with_offset(canvas, -half_width, dy).click_and_hold()
        for _ in range(2 * half_width // 6):
            actions.move_by_offset(6, 0)
        actions.release().perform()


def screenshots(model: str, out_dir: Path, work: Path) -> None:
    """Each tab after a run on `model`, as docs/webui_<tab>.png."""
    from dalle2_jax.data import shapes

    work.mkdir(parents=True, exist_ok=True)
    for name, colour, shape in (("red", "red", "circle"), ("blue", "blue", "square")):
        image = shapes.render_shape(colour, shape, diameter=28.0, center=(32.0, 32.0), background="white",
                                    image_size=64)
        Image.fromarray(image).save(work / f"{name}.png")
    with served(model, work / "serve.log") as (url, _), chromium((1280, 1000)) as driver:
        driver.get(url)
        set_text(driver, "#t2i-captions textarea", "a red circle\na green triangle\na blue square")
        print("t2i:", run_and_wait(driver, "t2i"))
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)
        driver.save_screenshot(str(out_dir / "webui_text_to_image.png"))
        for tab, label, inputs in (("variations", "Variations", [("#variations-image", "red.png")]),
                                   ("interpolation", "Interpolation", [("#interpolation-image-a", "red.png"),
                                                                       ("#interpolation-image-b", "blue.png")]),
                                   ("text-diff", "Text diff", [("#text-diff-image", "red.png")]),
                                   ("inpainting", "Inpainting", [("#inpainting-editor", "red.png")])):
            open_tab(driver, label)
            for css, name in inputs:
                upload(driver, css, work / name)
            if tab == "inpainting":
                time.sleep(1)
                draw_rectangle(driver, "#inpainting-editor")
            print(f"{tab}:", run_and_wait(driver, tab))
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(1)
            driver.save_screenshot(str(out_dir / f"webui_{tab.replace('-', '_')}.png"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="screenshots of every tab of `dalle2-jax serve` after a run")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--work", default=tempfile.mkdtemp(prefix="webui-shots-"))
    args = parser.parse_args()
    screenshots(args.model, Path(args.out), Path(args.work))
