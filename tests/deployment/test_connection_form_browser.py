"""
The PPIO connection form in the Airflow 3 UI, in a real (headless) browser.

Debian's chromium driven by Playwright (PyPI); ``scripts/install_browser.sh`` installs both. Without
them the test is skipped, except in CI (``CI`` set), where a missing browser is a set-up bug and fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from deployment_harness import Deployment

from airflow_provider_ppio.get_provider_info import CONN_FIELDS, UI_FIELD_BEHAVIOUR

pytestmark = [pytest.mark.deployment, pytest.mark.af3]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
UI_TIMEOUT_MS = 60_000
RELABELLED = UI_FIELD_BEHAVIOUR["relabeling"]  # {"password": "API Key", "host": "Base URL", "port": "Port (optional)"}
#: The labels Airflow gives the standard fields; the PPIO form must show none of them.
STANDARD_LABELS = {"host": "Host", "login": "Login", "password": "Password", "port": "Port", "schema": "Schema"}


def _unavailable(reason: str) -> None:
    message = f"{reason}; install it with scripts/install_browser.sh (Debian chromium + Playwright from PyPI)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium under Playwright (never Playwright's own browser download)."""
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
            yield browser
        finally:
            browser.close()


def _visible_labels(dialog: Any) -> set[str]:
    return {
        label.inner_text().strip().rstrip("*").strip() for label in dialog.locator("label").all() if label.is_visible()
    }


def _choose_type(page: Any, dialog: Any, name: str) -> None:
    dialog.get_by_role("combobox").click()
    page.keyboard.type(name)
    page.get_by_role("option", name=name, exact=True).click()


def test_add_connection_form_shows_ppio_fields(browser: Any, deployment: Deployment, deployment_out: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        # Log in through the Simple auth manager's form, as a user would.
        page.goto(f"{deployment.url}/connections")
        page.wait_for_url("**/auth/login**")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(deployment.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/login" not in url)
        page.goto(f"{deployment.url}/connections")
        page.get_by_role("button", name="Add Connection").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Add Connection")).to_be_visible()

        # Control: a type without a custom form shows Airflow's standard labels, so their absence below
        # is the PPIO provider's doing and not a locator that finds nothing.
        _choose_type(page, dialog, "HTTP")
        expect(dialog.get_by_text("Login", exact=True)).to_be_visible()
        assert set(STANDARD_LABELS.values()) <= _visible_labels(dialog)

        _choose_type(page, dialog, "PPIO")
        expect(dialog.get_by_text(RELABELLED["password"], exact=True)).to_be_visible()
        labels = _visible_labels(dialog)
        assert {RELABELLED["password"], RELABELLED["host"], RELABELLED["port"]} <= labels, labels
        assert not labels & set(STANDARD_LABELS.values()), f"standard fields still shown: {labels}"
        expect(dialog.get_by_label(RELABELLED["password"])).to_have_attribute("type", "password")
        placeholders = UI_FIELD_BEHAVIOUR["placeholders"]
        expect(dialog.get_by_label(RELABELLED["host"])).to_have_attribute("placeholder", placeholders["host"])
        expect(dialog.get_by_label(RELABELLED["password"])).to_have_attribute("placeholder", placeholders["password"])

        # Fill it in as a user pasting their key would, and keep the picture.
        dialog.get_by_label("Connection ID").fill("ppio_from_ui")
        dialog.get_by_label(RELABELLED["host"]).fill("https://api.novita.ai")
        dialog.get_by_label(RELABELLED["password"]).fill("sk_typed_in_the_browser")
        screenshot = deployment_out / "connection-form-ppio.png"
        page.screenshot(path=str(screenshot))

        # The provider's extra fields are in their own section, with their labels and help texts.
        dialog.get_by_text("Extra Fields", exact=True).click()
        for field in CONN_FIELDS.values():
            expect(dialog.get_by_label(field["label"])).to_be_visible()
            expect(dialog.get_by_text(field["description"])).to_be_visible()
        dialog.get_by_label(CONN_FIELDS["timeout"]["label"]).fill("20")
        page.screenshot(path=str(deployment_out / "connection-form-ppio-extra.png"))

        dialog.get_by_role("button", name="Save").click()
        expect(dialog).to_be_hidden()
    finally:
        page.close()

    # What the form saved is a PPIO connection the hook can read: key in password, URL in host.
    saved = deployment.api("GET", "/connections/ppio_from_ui")
    assert saved["conn_type"] == "ppio"
    assert saved["host"] == "https://api.novita.ai"
    assert saved["password"], "the API key field was not saved as the connection's password"
    assert not saved["login"] and saved["port"] is None and not saved["schema"]
    import json

    assert json.loads(saved["extra"])["timeout"] == 20
    deployment.api("DELETE", "/connections/ppio_from_ui", expect=204)
    assert screenshot.stat().st_size > 10_000
