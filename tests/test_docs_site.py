"""The built docs site in a real headless Chromium that can reach nothing but 127.0.0.1: every
Mermaid diagram renders as SVG from the script served with the site, and the page loads nothing
from another host."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_serve_page import CHROMEDRIVER, CHROMIUM, WAIT_S, _driver

ROOT = Path(__file__).resolve().parents[1]
DIAGRAM_PAGES = sorted(
    p.relative_to(ROOT / "docs").with_suffix("").as_posix()
    for p in (ROOT / "docs").glob("*.md")
    if "```mermaid" in p.read_text()
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"needs Debian's {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as `make docs` builds it, served on 127.0.0.1."""
    pytest.importorskip("mkdocs", reason="the docs extras: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stderr[-3000:]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_pages_with_diagrams_are_found():
    assert {"index", "design", "serving"} <= set(DIAGRAM_PAGES)


def test_every_diagram_renders_offline_from_the_site_itself(site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # no name resolves but loopback, so nothing outside this machine can be fetched
    driver = _driver("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    try:
        for page in DIAGRAM_PAGES:
            driver.get(f"{site}/" if page == "index" else f"{site}/{page}/")
            expected = len(driver.find_elements(By.CSS_SELECTOR, ".mermaid"))
            assert expected >= 1, page
            # Material replaces each <pre class="mermaid"> (the diagram's source) with a <div
            # class="mermaid"> holding Mermaid's SVG in a closed shadow root: no text, a real size
            WebDriverWait(driver, WAIT_S).until(
                lambda d, n=expected: len(d.find_elements(By.CSS_SELECTOR, "div.mermaid")) == n,
                message=f"{page}: not all of its {expected} diagrams rendered",
            )
            for diagram in driver.find_elements(By.CSS_SELECTOR, "div.mermaid"):
                assert diagram.text == "" and diagram.size["height"] > 50, page
            hosts = driver.execute_script(
                "return performance.getEntriesByType('resource').map(r => new URL(r.name).host)"
            )
            assert {h for h in hosts if not h.startswith("127.0.0.1")} == set(), page
    finally:
        driver.quit()
