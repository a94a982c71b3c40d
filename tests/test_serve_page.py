"""The page at GET / in a real headless Chromium: upload a digit through its file input and read the
top-1 label it shows, which must equal what `visiontune predict` (OnnxClassifier) says for that file."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve import serving

from visiontune.components import manifest
from visiontune.components.predict import OnnxClassifier

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"needs Debian's {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


def _driver(*flags: str):
    """Headless Debian Chromium under chromedriver, with `flags` added to its command line."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_page_upload_shows_the_top1_label_of_visiontune_predict(exported, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, layout = exported
    onnx = layout.export / "model.onnx"
    frame = manifest.read(layout.prepare / "manifest.csv")
    paths = [str(Path(p).resolve()) for p in frame.loc[frame["split"] == "test", "path"]]
    expected = {Path(r["path"]).name: r["label"] for r in OnnxClassifier(onnx).predict(paths, top_k=1)}
    # a few uploads, with different expected labels where the tiny model gives them
    picks = list({expected[Path(p).name]: p for p in paths}.values())[:3]
    picks += [p for p in paths if p not in picks][: max(0, 2 - len(picks))]

    with serving(tmp_path, "--model", str(onnx)) as url:
        driver = _driver()
        try:
            wait = WebDriverWait(driver, WAIT_S)
            driver.get(f"{url}/")
            wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)  # v1/model answered
            for path in picks:
                old = driver.find_elements(By.ID, "top1")
                driver.find_element(By.ID, "file").send_keys(path)
                if old:
                    wait.until(ec.staleness_of(old[0]))  # the previous answer was cleared
                top1 = wait.until(ec.visibility_of_element_located((By.ID, "top1")))
                assert driver.find_element(By.ID, "error").text == ""
                assert top1.text == expected[Path(path).name], path
                assert len(driver.find_elements(By.CSS_SELECTOR, "#result .row")) >= 1
        finally:
            driver.quit()
