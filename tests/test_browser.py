"""The upload page in a real browser: headless Chromium (Debian's `chromium`, installed by
.ci/run) driven by Playwright against the real server on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import SHARED_CIFAR
from tests.test_serve import Server
from vitdeploy.data import load_test

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no Chromium here (apt-get install chromium; .ci/run does)")


def test_page_classifies_an_upload_and_shows_where_the_model_looked(exported: Path, cifar_root: Path, tmp_path: Path) -> None:
    data = SHARED_CIFAR.parent if (SHARED_CIFAR / "test_batch").is_file() else cifar_root  # a real CIFAR-10 test image when present
    image = tmp_path / "upload.png"
    Image.fromarray(load_test(data).images[0].permute(1, 2, 0).numpy()).save(image)
    server = Server(exported, "--max-batch", "8")
    try:
        expected = httpx.post(server.url + "/v1/predict?top_k=5", content=image.read_bytes(), timeout=30).json()["predictions"]
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            failed: list[str] = []
            page.on("response", lambda response: failed.append(f"{response.status} {response.url}") if response.status >= 400 else None)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('vit_cifar_tiny')")
            assert not page.is_visible("#preview")  # no broken-image box before an upload
            page.set_input_files("#file", str(image))
            page.click("button[type=submit]")
            page.wait_for_function("document.querySelectorAll('#result tr').length === 5", timeout=30_000)
            page.wait_for_function("(() => { const o = document.getElementById('overlay');"
                                   " return o.complete && o.naturalWidth > 0 && o.src.startsWith('blob:'); })()", timeout=60_000)
            rows = page.eval_on_selector_all("#result tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])")
            assert [label for label, _ in rows] == [p["label"] for p in expected]
            for (_, shown), p in zip(rows, expected, strict=True):
                assert abs(float(shown.rstrip("%")) - 100 * p["probability"]) <= 0.051, (shown, p)
            overlay = page.eval_on_selector("#overlay", "o => [o.naturalWidth, o.src]")
            assert overlay[0] == 224
            assert page.is_visible("#preview")
            page.click("#toggle")  # the uploaded image, then the overlay again
            assert page.eval_on_selector("#overlay", "o => o.src") == page.eval_on_selector("#preview", "p => p.src")
            page.click("#toggle")
            assert page.eval_on_selector("#overlay", "o => o.src") == overlay[1]
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
        assert failed == [], failed  # no 404 for a favicon or anything else
        assert (tmp_path / "page.png").stat().st_size > 0
    finally:
        assert server.stop() == 0
