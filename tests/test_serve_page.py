"""The operator page of `docl-flower filter serve` (``GET /``), in a real headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them
when it runs as root) and ``selenium`` (the dev extra); without them it is skipped, saying why.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.filter.store import save_filter
from docl_flower.operations import deciding
from docl_flower.operations.serve import create_app

from .conftest import trained_registration
from .test_serve import AUTH, INFO, TOKEN, _png_bytes

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NO_BROWSER = not (CHROMIUM.exists() and CHROMEDRIVER.exists())


@pytest.fixture(scope="module")
def train(tiny_root: Path) -> dict[int, np.ndarray]:
    """60 MNIST training digits of class 0 and 60 of class 1 (uint8, 28 x 28)."""
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("train")
    return {c: images[labels == c][:60] for c in (0, 1)}


@pytest.fixture(scope="module")
def saved(train: dict[int, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filter of two users: user 0 owns the digit 0, user 1 the digit 1."""
    pixels = {
        u: torch.tensor(train[u].reshape(60, -1) / 255.0, dtype=torch.float32) for u in (0, 1)
    }
    regs = [trained_registration(pixels[u], u, u, epochs=10, seed=u) for u in (0, 1)]
    folder = tmp_path_factory.mktemp("page") / "filter"
    save_filter(folder, regs, info=INFO)
    return folder


@pytest.fixture(scope="module")
def images(saved: Path, train: dict[int, np.ndarray]) -> dict[str, bytes]:
    """``own``: a digit of user 0 that a third party may not share; ``harmless``: noise."""
    loaded = deciding.load(saved)
    decided = deciding.decide(loaded, train[0], -1)
    own = next(i for i, d in enumerate(decided) if d.block and d.owner == 0)
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    assert deciding.decide(loaded, noise, -1)[0].decision == "share"
    return {"own": _png_bytes(train[0][own]), "harmless": _png_bytes(noise[0])}


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_needs_no_token_holds_no_filter_data_and_has_a_strict_csp(saved, images):
    with TestClient(create_app(saved, token=TOKEN, decoders=1, allow_unchecked=True)) as client:
        page = client.get("/")
        before = client.get("/v1/stats", headers=AUTH).json()
        client.post(
            "/v1/check?uploader=-1", files={"image": ("a.png", images["own"])}, headers=AUTH
        )
        after = client.get("/v1/stats", headers=AUTH).json()
        unauthorized = client.get("/v1/stats").status_code
        version = client.get("/v1/filter", headers=AUTH).json()["version"]
    # the page: no token needed, nothing of the filter in it, nothing from elsewhere
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.text
    assert "<script>" in html and "/v1/filter" in html and version not in html
    outside = (
        r"(?i:\b(?:https?|wss?|ftp|file|data):)|//\w|\s(?:src|href|action)\s*=|\burl\(|@import"
    )
    assert re.findall(outside, html) == []
    # the policy: this origin only; exactly the page's own inline script and style
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert csp == {
        "default-src": "'none'",
        "script-src": _sha256(script),
        "style-src": _sha256(style),
        "img-src": "blob:",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    assert page.headers["x-content-type-options"] == "nosniff"
    # the counts it shows: /v1/stats, behind the token
    assert before == {"decisions": {"block": 0, "share": 0, "error": 0}, "queue_depth": 0}
    assert after["decisions"] == {"block": 1, "share": 0, "error": 0}
    assert unauthorized == 401


@contextlib.contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    """``app`` on a free loopback port (uvicorn in a thread); yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.mark.skipif(NO_BROWSER, reason=f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing")
def test_an_operator_checks_images_in_a_real_browser(saved, images, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # Prepare: the two images as files, the service, a headless Chromium (no sandbox: CI is root).
    for name, data in images.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=900,1100")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    shot = tmp_path / "operator-page.png"
    with _serving(create_app(saved, token=TOKEN, decoders=1, allow_unchecked=True)) as url:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            wait = WebDriverWait(driver, 15)

            def text(element_id: str) -> str:
                return str(driver.find_element(By.ID, element_id).get_attribute("textContent"))

            def shows(element_id: str, expected: str) -> None:
                wait.until(lambda _: text(element_id) == expected, f"{element_id}: {expected}")

            # Execute: a wrong token, then the right one.
            driver.get(url + "/")
            token = driver.find_element(By.ID, "token")
            token.send_keys("wrong-token-0123456789\n")
            wait.until(lambda _: text("status").startswith("unauthorized"))
            token.clear()
            token.send_keys(TOKEN)
            driver.find_element(By.ID, "connect").click()
            shows("status", "connected")
            filter_shown = {k: text(k) for k in ("users", "classes", "guard", "alpha", "counts")}
            # user 0's digit from a third party; then from user 0 itself; then noise.
            upload = driver.find_element(By.ID, "file")
            upload.send_keys(str(tmp_path / "own.png"))
            shows("decision", "block")
            blocked = text("detail")
            Select(driver.find_element(By.ID, "uploader")).select_by_value("0")
            shows("decision", "share")
            owned = text("detail")
            Select(driver.find_element(By.ID, "uploader")).select_by_value("-1")
            wait.until(lambda _: text("detail").startswith("own.png: uploader -1"))
            upload.send_keys(str(tmp_path / "harmless.png"))
            wait.until(lambda _: text("detail").startswith("harmless.png: uploader -1"))
            shared = text("decision")
            shows("counts", "block 2, share 2, error 0")
            driver.save_screenshot(str(shot))
            logs = driver.get_log("browser")
            stored = driver.execute_script("return sessionStorage.getItem('docl-flower-token')")
            # an inline script that is not the page's own does not run
            injected = driver.execute_script(
                "const s = document.createElement('script'); s.textContent = 'window.hit = 1';"
                "document.body.append(s); return window.hit === undefined;"
            )
        finally:
            driver.quit()
    # Assert
    assert filter_shown == {
        "users": "0, 1",
        "classes": "0, 1",
        "guard": "paper (two-sided)",
        "alpha": "1.5 (at most 2)",
        "counts": "block 0, share 0, error 0",
    }
    assert blocked.startswith("own.png: uploader -1, owner 0, class 0, score ")
    assert re.search(r"against \[\d+(\.\d+)?, \d+(\.\d+)?\]$", blocked), blocked
    assert owned.startswith("own.png: uploader 0, owner 0")
    assert shared == "share"
    assert stored == TOKEN and injected
    problems = [e for e in logs if "Content Security Policy" in e["message"]]
    assert problems == [] and not [e for e in logs if e["source"] == "javascript"], logs
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 1000
