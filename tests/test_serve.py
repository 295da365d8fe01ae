"""`dalle2-jax serve` in a real browser: the server runs as a subprocess on a free 127.0.0.1 port
with a tiny random pipeline, and Debian's headless Chromium (selenium) uses the page as a person
would. Never skipped: without /usr/bin/chromium and /usr/bin/chromedriver it fails (.ci/run
installs them)."""
import numpy as np
import pytest
from PIL import Image

from dalle2_jax import serve
from test_pipeline import OUT, tiny_pipeline
from webui_browser import (chromium, element, gallery_images, resources_off_host, run_and_wait, served, set_text)


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("serve")
    tiny.save_pretrained(root / "model")
    with served(root / "model", root / "serve.log") as (url, log), chromium() as driver:
        driver.get(url)
        element(driver, "#t2i-run", timeout=60)
        yield driver, url, log, root


def generate(driver, caption: str, seed: int, count: int = 2):
    set_text(driver, "#t2i-captions textarea", caption)
    set_text(driver, "#t2i-seed input", str(seed))
    status = run_and_wait(driver, "t2i")
    return status, (gallery_images(driver, "t2i", count) if "Error" not in status else [])


def test_generate_in_the_browser_and_download_the_images(page):
    driver, url, log, _ = page
    status, first = generate(driver, "a red circle", seed=1)
    assert status.startswith(f"2 images of {OUT}x{OUT}"), status
    assert [image.shape for image in first] == [(OUT, OUT, 3)] * 2
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1.0  # two images per caption, not one twice
    status, second = generate(driver, "a red circle", seed=2)
    assert status.startswith("2 images"), status
    assert np.abs(first[0].astype(int) - second[0]).mean() > 1.0  # the seed reaches the pipeline
    assert resources_off_host(driver, url) == []  # fonts, scripts, images: all from 127.0.0.1
    requests = [line for line in log.read_text().splitlines() if line.startswith("[serve] request")]
    assert len(requests) == 2, requests


def test_bad_input_shows_the_pipelines_message_and_the_server_keeps_serving(page):
    driver, url, _, root = page
    status, _ = generate(driver, "", seed=0)
    assert "Error" in status and "prompts[0]: expected a non-empty caption" in status, status
    assert "expected a non-empty caption" in driver.find_element("css selector", "body").text
    # A file that is not an image: the page's upload refuses it, so the pipeline is asked for none;
    # sent past the page (gradio's HTTP API, as a script would), the pipeline names the file.
    (root / "notes.txt").write_text("not an image")
    driver.find_element("xpath", "//button[@role='tab'][normalize-space()='Variations']").click()
    element(driver, "#variations-image input[type=file]").send_keys(str(root / "notes.txt"))
    status = run_and_wait(driver, "variations", timeout=60)
    assert "image: expected an uploaded image" in status, status
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    _, status = client.predict(handle_file(str(root / "notes.txt")), 2, 0, 3, 3.0, False, api_name="/variations")
    assert "image:" in status and "notes.txt' is not a readable image" in status, status
    driver.find_element("xpath", "//button[@role='tab'][normalize-space()='Text to image']").click()
    status, images = generate(driver, "a blue square", seed=3)
    assert status.startswith("2 images") and images[0].shape == (OUT, OUT, 3), status


def test_every_request_waits_for_the_one_pipeline_slot(tiny):
    demo = serve.build_demo(tiny)
    events = [fn for fn in demo.fns.values() if fn.fn is not None]
    assert sorted(fn.api_name for fn in events) == ["generate", "inpaint", "interpolate", "text_diff", "variations"]
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in events} == {("pipeline", 1)}


def test_handlers_turn_page_values_into_pipeline_arguments(tmp_path):
    """The parts of the page's handlers that the browser tests cannot single out."""
    assert serve.captions_from_text(" a red circle \n\n a blue square\n") == ["a red circle", "a blue square"]
    assert serve.captions_from_text("  \n") == ["  \n"]  # left for the pipeline to refuse, by name
    background = tmp_path / "background.png"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(background)
    layer = np.zeros((3, 4, 4), np.uint8)  # painted at half the size: scaled up to the image's
    layer[1, 2:, 3] = 255
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    path, mask = serve.mask_from_editor({"background": {"path": str(background)},
                                         "layers": [{"path": str(tmp_path / "layer.png")}]})
    assert path == str(background) and mask.shape == (6, 8)
    expected = np.zeros((6, 8), bool)
    expected[2:4, 4:] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="image"):
        serve.mask_from_editor({"background": None, "layers": []})
