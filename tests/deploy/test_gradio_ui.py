"""The Gradio page in a real headless Chromium: upload, verdict, heat map, nothing phones home.

The page is launched in-process on 127.0.0.1 with a fake inferencer (bright images are
anomalous, the map is the brightness), so the verdict and the heat map can be checked exactly.
Skips, saying what to install, when Chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from anomaly_deploy.serve._common import heatmap_overlay, mask_image
from anomaly_deploy.serve.gradio_ui import build_demo, format_verdict, launch_demo

TIMEOUT = 60  # seconds; generous for a loaded 2-core machine, never reached when all is well
CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
    # Hermetic: the browser can resolve nothing but the page's own address.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


@dataclass(frozen=True)
class FakePrediction:
    pred_score: float
    pred_label: bool
    anomaly_map: np.ndarray
    pred_mask: np.ndarray


class FakeInferencer:
    metadata: dict[str, Any] = {"model": "fake_model", "format": "onnx", "precision": "fp32"}  # noqa: RUF012

    def predict(self, image: np.ndarray) -> FakePrediction:
        return fake_prediction(image)


def fake_prediction(image: np.ndarray) -> FakePrediction:
    anomaly_map = image.astype(np.float32).mean(axis=2) / 255.0
    score = float(anomaly_map.mean())
    return FakePrediction(score, score >= 0.5, anomaly_map, anomaly_map >= 0.5)


def test_verdict_line() -> None:
    assert format_verdict("anomalous", 0.87349) == "anomalous (score 0.873)"
    assert format_verdict("normal", 0.0) == "normal (score 0.000)"


def test_build_demo_turns_gradio_analytics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")

    demo = build_demo(FakeInferencer())

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert demo.analytics_enabled is False
    assert demo.title == "anomaly: fake_model"


# --- the browser test ---------------------------------------------------------------------


def _browser() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium")
    chromium = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(
            name
            for name, path in (("chromium", chromium), ("chromedriver", driver))
            if path is None
        )
        pytest.skip(
            f"{missing} not found; install them (Debian: apt-get install chromium "
            f"chromium-driver) to run the browser test"
        )
    return chromium, driver


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Connections:
    """Audit hook recording the hosts this process resolves or connects to while active."""

    def __init__(self) -> None:
        self.active = False
        self.hosts: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "socket.getaddrinfo" and isinstance(args[0], str | bytes):
            self.hosts.append(os.fsdecode(args[0]))
        elif event == "socket.connect" and isinstance(args[1], tuple):
            self.hosts.append(str(args[1][0]))


@pytest.fixture
def connections() -> Iterator[Connections]:
    recorder = Connections()
    sys.addaudithook(recorder)  # audit hooks cannot be removed; this one is inert when inactive
    recorder.active = True
    yield recorder
    recorder.active = False


@pytest.fixture
def page_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connections: Connections
) -> Iterator[str]:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio_cache"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_demo(FakeInferencer())
    url = launch_demo(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium_profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


@pytest.mark.enable_socket
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated")
@pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")
def test_page_shows_verdict_and_heatmap_in_a_real_browser(
    page_url: str, browser: Any, tmp_path: Path, connections: Connections
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # RGBA whose left quarter is transparent white: decoded as training reads files, it
    # becomes black (alpha onto black), which Gradio's own RGB conversion would not do.
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, 16:] = np.linspace(120, 255, 48).round().astype(np.uint8)[None, :, None]
    rgba = np.dstack([image, np.full((48, 64), 255, dtype=np.uint8)])
    rgba[:, :16] = (255, 255, 255, 0)
    image_file = tmp_path / "part.png"
    Image.fromarray(rgba).save(image_file)
    expected = fake_prediction(image)
    wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.1)

    browser.get(page_url)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(image_file))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    browser.find_element(By.CSS_SELECTOR, "#detect").click()

    def verdict(driver: Any) -> str | None:
        boxes = driver.find_elements(By.CSS_SELECTOR, "#verdict textarea, #verdict input")
        value = boxes[0].get_attribute("value") if boxes else None
        return value or None

    shown = wait.until(verdict)
    heatmap_src = wait.until(
        lambda d: next(
            (
                src
                for img in d.find_elements(By.CSS_SELECTOR, "#heatmap img")
                if (src := img.get_attribute("src"))
            ),
            None,
        )
    )
    mask_src = wait.until(
        lambda d: next(
            (
                src
                for img in d.find_elements(By.CSS_SELECTOR, "#mask img")
                if (src := img.get_attribute("src"))
            ),
            None,
        )
    )
    screenshot = Path(os.environ.get("ANOMALY_SCREENSHOT_DIR", tmp_path)) / "gradio_page.png"
    browser.save_screenshot(str(screenshot))
    requested = _requested_urls(browser)
    heatmap = np.asarray(Image.open(io.BytesIO(httpx.get(heatmap_src, timeout=30).content)))
    mask = np.asarray(Image.open(io.BytesIO(httpx.get(mask_src, timeout=30).content)))
    connections.active = False

    assert expected.pred_label is True
    assert shown == format_verdict("anomalous", expected.pred_score)
    np.testing.assert_array_equal(heatmap[..., :3], heatmap_overlay(image, expected.anomaly_map))
    assert mask.shape[:2] == (48, 64)
    np.testing.assert_array_equal(mask.reshape(48, 64, -1)[..., 0], mask_image(expected.pred_mask))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    web = [url for url in requested if urlsplit(url).scheme in {"http", "https", "ws", "wss"}]
    assert any(url.startswith(page_url) for url in web)
    assert [url for url in web if not _is_loopback(urlsplit(url).hostname)] == []
    assert [host for host in connections.hosts if not _is_loopback(host)] == []
