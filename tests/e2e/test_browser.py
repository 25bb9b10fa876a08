"""A real browser (Debian's Chromium driven by Playwright) clicks Deploy and watches the log."""

from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture
def page(panel):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(panel.url + "/login/")
            page.fill("input[name=username]", panel.user)
            page.fill("input[name=password]", panel.password)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_url(panel.url + "/")
            yield page
        finally:
            browser.close()


def test_clicking_deploy_shows_the_log_live_and_the_final_status(panel, page):
    page.goto(panel.url + "/nodes/chatty/")
    page.select_option("select[name=action]", "switch")
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    # Lines arrive while the deployment runs, before it is complete.
    page.wait_for_function("document.querySelectorAll('#log [data-seq]').length > 100")
    page.wait_for_function("document.body.dataset.logState === 'complete'", timeout=120_000)
    assert "Succeeded" in page.inner_text("#status")
    text = page.inner_text("#log")
    assert "activating the configuration..." in text
    assert "paced line 00003000" in text
    seqs = page.eval_on_selector_all("#log [data-seq]", "els => els.map(e => Number(e.dataset.seq))")
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gaps or duplicates in the page"


def test_a_failing_deploy_shows_failed_with_its_exit_code_and_stderr(panel, page):
    page.goto(panel.url + "/nodes/failing/")
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    page.wait_for_function("document.body.dataset.logState === 'complete'", timeout=120_000)
    assert "Failed" in page.inner_text("#status")
    err_lines = page.eval_on_selector_all("#log .err", "els => els.map(e => e.textContent)")
    assert any("the following units failed" in t for t in err_lines), "stderr lines are marked"
