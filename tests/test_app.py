"""The Gradio demo: classify() on the image modes users upload, the command line, and the
page itself driven in Debian's headless Chromium (skipped where it is not installed;
.ci/run installs it)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# Nothing the demo starts may try the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import app  # noqa: E402
from attention_maps import display_image, model_outputs, overlay, relevance_map, rollout_map  # noqa: E402
from configuration_hybrid_vit import HybridViTConfig  # noqa: E402
from modeling_hybrid_vit import HybridViTForImageClassification, save_model_and_processor  # noqa: E402

from .conftest import PROJECT_ROOT, TINY_MODEL  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PAGE_TIMEOUT = 60  # seconds, for each of: server start, page load, prediction shown


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model for the ten CIFAR-10 classes whose classifier weights are larger than the
    initialisation's, so that its probabilities differ clearly from one class to the next."""
    torch.manual_seed(0)
    model = HybridViTForImageClassification(HybridViTConfig(**TINY_MODEL)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("tiny-model")
    save_model_and_processor(model, folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_folder):
    return app.load_model(str(model_folder))


@pytest.fixture(scope="module")
def classify(loaded):
    return app.make_classifier(*loaded)


@pytest.fixture(scope="module")
def hub_pipeline(model_folder):
    """The model as a Hub user runs it: transformers' image-classification pipeline."""
    from transformers import pipeline

    return pipeline("image-classification", model=str(model_folder), trust_remote_code=True)


def photo(size=(40, 24)):
    """A non-square RGB gradient, so that the attention is not uniform."""
    x, y = np.meshgrid(np.linspace(0, 255, size[0]), np.linspace(0, 255, size[1]))  # (H, W) each
    pixels = np.stack([x, y, np.full_like(x, 90.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_classify_shows_the_five_most_probable_classes_as_the_pipeline_scores_them(classify, hub_pipeline, mode):
    image = photo().convert(mode)
    labels, overlay = classify(image)
    expected = hub_pipeline(image, top_k=app.TOP_K)  # the five largest of the softmax, most probable first
    assert list(labels) == [row["label"] for row in expected]
    assert list(labels.values()) == pytest.approx([row["score"] for row in expected], abs=1e-6)
    # Most probable first, each more probable than the next by more than the tolerance above,
    # so that the order compared is not a matter of rounding.
    values = list(labels.values())
    assert all(a - b > 1e-6 for a, b in zip(values, values[1:]))
    assert overlay.shape == (app.OVERLAY_SIZE, app.OVERLAY_SIZE, 3) and overlay.dtype == np.uint8


def test_classify_ignores_an_opaque_alpha_channel(classify):
    rgb_labels, rgb_overlay = classify(photo())
    rgba_labels, rgba_overlay = classify(photo().convert("RGBA"))
    assert rgba_labels == pytest.approx(rgb_labels)
    np.testing.assert_array_equal(rgba_overlay, rgb_overlay)


def test_classify_clears_outputs_when_the_input_is_cleared(classify):
    assert classify(None) == (None, None)


def test_bundled_examples_are_small_rgb_drawings():
    examples = sorted(app.EXAMPLES_DIR.glob("*.png"))
    assert len(examples) >= 3
    for path in examples:
        assert path.stat().st_size < 20_000, f"{path.name} is too large to commit"
        with Image.open(path) as image:
            assert image.convert("RGB").size[0] >= 32


def test_missing_model_is_one_line_error(tmp_path, capsys):
    assert app.main(["--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model folder not found: {tmp_path / 'missing'}"


def test_model_comes_from_the_environment_without_flag(monkeypatch):
    monkeypatch.setenv(app.MODEL_VARIABLE, "some/model")
    assert app.parse_args([]).model == "some/model"
    monkeypatch.delenv(app.MODEL_VARIABLE)
    with pytest.raises(SystemExit):
        app.parse_args([])


def test_space_header_runs_this_app():
    text = (PROJECT_ROOT / "space" / "README.md").read_text()
    assert text.startswith("---\n"), "a Space README starts with its YAML header"
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["sdk"] == "gradio"
    assert (PROJECT_ROOT / header["app_file"]).is_file()


# ------------------------------------------------------------------ the page in a browser


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url, server, log_path):
    deadline = time.monotonic() + PAGE_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {PAGE_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def demo_url(model_folder, tmp_path):
    """app.py in a subprocess on a free loopback port; always stopped afterwards."""
    port = free_loopback_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1")
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(model_folder)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, server, log_path)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser or driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_prediction_and_overlay_for_an_upload(browser, demo_url, classify, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    upload = tmp_path / "upload.png"
    photo((48, 32)).convert("RGBA").save(upload)
    expected_top = next(iter(classify(Image.open(upload))[0]))

    browser.get(demo_url)
    wait = WebDriverWait(browser, PAGE_TIMEOUT)
    file_input = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
    file_input.send_keys(str(upload))

    # gr.Label writes the top class into an <h2> and one row per class once classify() answered.
    def shown_top(driver):
        return " ".join(e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, "#prediction .output-class"))

    try:
        wait.until(lambda driver: shown_top(driver) == expected_top)
    except TimeoutException:
        pytest.fail(f"the page shows {shown_top(browser)!r} as the top class, expected {expected_top!r}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#prediction [data-testid$='-confidence-set']")
    assert len(rows) == app.TOP_K
    overlay = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rollout img")))
    wait.until(lambda driver: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == app.OVERLAY_SIZE


def test_the_demo_draws_the_chosen_map_rollout_by_default(loaded):
    """Over the image as the model sees it (squashed to a square): the attention rollout by
    default, the relevance for the predicted class when asked; the prediction is the same."""
    model, processor = loaded
    assert app.DEFAULT_METHOD == "rollout" and app.parse_args(["--model", "m"]).method == "rollout"
    image = photo()
    shown = display_image(image, app.OVERLAY_SIZE)
    rollout = app.make_classifier(model, processor)(image)
    relevance = app.make_classifier(model, processor, "relevance")(image)
    assert rollout[0] == pytest.approx(relevance[0])
    expected_rollout = overlay(shown, rollout_map(model_outputs(model, processor, [image]).attentions)[0])
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    expected_relevance = overlay(shown, relevance_map(model, pixel_values)[0][0])
    np.testing.assert_array_equal(rollout[1], (expected_rollout * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(relevance[1], (expected_relevance * 255).round().astype(np.uint8))
    assert not np.array_equal(relevance[1], rollout[1])


def test_a_model_without_transformer_blocks_is_refused_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = HybridViTConfig(**{**TINY_MODEL, "num_hidden_layers": 0, "class_attention_layers": 0, "pooling": "mean"})
    save_model_and_processor(HybridViTForImageClassification(backbone).eval(), tmp_path / "backbone")
    assert app.main(["--model", str(tmp_path / "backbone")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'backbone'} has no transformer blocks (the backbone alone): the demo draws attention")
