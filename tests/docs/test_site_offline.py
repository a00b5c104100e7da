"""
The docs site works when opened from disk (``file://``): navigation between pages and search.

The site is built with the docs venv (``$VENVS/docs``, default ``.venvs/docs``; in CI it is built first if
missing, since ``make docs`` runs after ``make test``) into a temporary directory, and opened in headless Debian
chromium driven by Playwright, as the deployment tests' browser check does (``scripts/install_browser.sh``).
Without the docs venv or the browser the test is skipped, except that in CI (``CI`` set) a missing browser fails on
Airflow 3, the venv scripts/install_browser.sh installs Playwright into.
``PPIO_SITE_DIR`` points it at a site built already.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 30_000


def _unavailable(reason: str) -> None:
    from airflow import __version__ as airflow_version

    if os.environ.get("CI") and not airflow_version.startswith("2."):
        pytest.fail(f"{reason}; install it with scripts/install_browser.sh")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site: ``PPIO_SITE_DIR``, or a fresh ``mkdocs build --strict``."""
    if os.environ.get("PPIO_SITE_DIR"):
        return Path(os.environ["PPIO_SITE_DIR"])
    mkdocs = Path(os.environ.get("VENVS", ROOT / ".venvs")) / "docs" / "bin" / "mkdocs"
    if not mkdocs.exists() and os.environ.get("CI"):
        subprocess.run([str(ROOT / "scripts" / "bootstrap.sh"), "docs"], cwd=ROOT, check=True)
    if not mkdocs.exists():
        pytest.skip(f"no docs venv at {mkdocs.parent.parent} (make docs builds it)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(out)], cwd=ROOT, env=env, check=True)
    return out


@pytest.fixture(scope="module")
def page(site: Path) -> Iterator[Any]:
    """A page of headless Debian chromium under Playwright (never Playwright's own browser download)."""
    chromium = os.environ.get("PPIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        _unavailable(f"no chromium executable at {chromium}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(TIMEOUT_MS)
            yield tab
        finally:
            browser.close()


def test_pages_are_files_not_directories(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "troubleshooting.html").is_file() and (site / "howto" / "sensor.html").is_file()
    assert not (site / "troubleshooting" / "index.html").exists()


def test_navigation_works_from_disk(site: Path, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto((site / "index.html").as_uri())
    page.locator("nav.md-nav--primary a.md-nav__link", has_text="Troubleshooting").first.click()
    expect(page).to_have_url((site / "troubleshooting.html").as_uri())
    expect(page.locator("article h1")).to_contain_text("Troubleshooting")
    page.locator("article a", has_text="the failure contract").first.click()
    expect(page).to_have_url((site / "reliability.html").as_uri() + "#the-failure-contract")


def test_search_works_from_disk(site: Path, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto((site / "howto" / "sensor.html").as_uri())
    search = page.locator("input.md-search__input")
    search.click()  # needs the search worker, which file:// runs only through the vendored iframe-worker shim
    search.press_sequentially("allow_insecure_http", delay=20)  # typed: the search listens to key events
    results = page.locator(".md-search-result__item")
    expect(results.first).to_be_visible()
    expect(page.locator(".md-search-result__meta")).to_contain_text("matching")
    results.first.locator("a").first.click()
    assert page.url.startswith((site / "").as_uri()) and ".html" in page.url
