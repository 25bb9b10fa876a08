"""A real browser (Debian's Chromium driven by Playwright) clicks Deploy and watches the log, under the
panel's Content-Security-Policy: every test fails on a violation the browser reports."""

from __future__ import annotations

import shutil

import pytest

from tests.support.wait import wait_for

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
            page.csp_violations = []  # what the console says and securitypolicyviolation events, per page
            page.on(
                "console",
                lambda m: page.csp_violations.append(m.text) if "Content Security Policy" in m.text else None,
            )
            page.add_init_script(CSP_LISTENER)
            page.goto(panel.url + "/login/")
            page.fill("input[name=username]", panel.user)
            page.fill("input[name=password]", panel.password)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_url(panel.url + "/")
            yield page
            assert not page.csp_violations + page_violations(page), "the page broke its Content-Security-Policy"
        finally:
            browser.close()


# Injected by the browser driver (not subject to the policy): remembers every violation of the page.
CSP_LISTENER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${e.sourceFile}:${e.lineNumber}`));
"""


def page_violations(page) -> list[str]:
    return page.evaluate("window.__csp || []")


def wait_js(page, expression: str, timeout: float = 60):
    """Poll ``expression`` from here: Playwright's wait_for_function evaluates strings with eval() inside
    the page, which the policy (no 'unsafe-eval') refuses; page.evaluate() goes through the debugger."""
    return wait_for(lambda: page.evaluate(expression), timeout=timeout, interval=0.1, what=expression)


def test_the_pages_run_under_the_content_security_policy(panel, page):
    """The log page's script, its WebSocket and its fetches work under the policy; other pages load clean."""
    response = page.goto(panel.url + "/nodes/devm/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.uncheck("#id_diff")  # a plain deploy: no difference shown first
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    wait_js(page, "document.body.dataset.logState === 'complete'", timeout=120)
    assert int(page.inner_text("#log-shown")) > 0, "log.js ran and the WebSocket delivered lines"
    assert page.eval_on_selector("#log", "el => el.querySelectorAll('[data-seq]').length") > 0
    for path in ("/", "/deployments/", "/audit/", "/teams/", "/admin/"):
        page.goto(panel.url + path)
        page.wait_for_load_state("networkidle")
        assert not page.csp_violations + page_violations(page), f"{path}: {page.csp_violations + page_violations(page)}"


def test_clicking_deploy_shows_the_log_live_and_the_final_status(panel, page):
    sockets, compressed_frames = [], []

    def watch(ws):
        sockets.append(ws.url)
        ws.on("framereceived", lambda payload: compressed_frames.append(payload[:1] == b"x"))

    page.on("websocket", watch)
    page.goto(panel.url + "/nodes/chatty/")
    page.select_option("select[name=action]", "switch")
    page.uncheck("#id_diff")  # a plain deploy: no difference shown first
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    # Lines arrive while the deployment runs, before it is complete.
    wait_js(page, "document.querySelectorAll('#log [data-seq]').length > 100")
    wait_js(page, "document.body.dataset.logState === 'complete'", timeout=120)
    assert "Succeeded" in page.inner_text("#status")
    text = page.inner_text("#log")
    assert "activating the configuration..." in text
    assert "paced line 00003000" in text
    seqs = page.eval_on_selector_all("#log [data-seq]", "els => els.map(e => Number(e.dataset.seq))")
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gaps or duplicates in the page"
    # Chromium inflates: the page asked for compressed `lines`, and they came as zlib streams (0x78 …).
    assert sockets and all("compress=deflate" in url for url in sockets), sockets
    assert any(compressed_frames), "no compressed lines frame reached the page"


def test_a_failing_deploy_shows_failed_with_its_exit_code_and_stderr(panel, page):
    page.goto(panel.url + "/nodes/failing/")
    page.uncheck("#id_diff")  # a plain deploy: no difference shown first
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    wait_js(page, "document.body.dataset.logState === 'complete'", timeout=120)
    assert "Failed" in page.inner_text("#status")
    err_lines = page.eval_on_selector_all("#log .err", "els => els.map(e => e.textContent)")
    assert any("the following units failed" in t for t in err_lines), "stderr lines are marked"


def test_a_rollout_page_follows_every_node_live_and_shows_a_failed_nodes_last_lines(panel, page):
    """Started from the form; the page polls its JSON (rollout.js, under the policy) until the end, no reload."""
    page.goto(panel.url + "/rollouts/new/")
    page.fill("input[name=nodes]", "devm failing chatty")
    page.fill("input[name=parallelism]", "2")
    page.click("#rollout-button")
    page.wait_for_url("**/rollouts/*/")
    loaded_at = page.evaluate("performance.timeOrigin")
    wait_js(page, "document.body.dataset.rolloutState === 'complete'", timeout=180)
    assert page.evaluate("performance.timeOrigin") == loaded_at, "the page was never reloaded"
    assert page.evaluate("window.panelRollout.polls") > 1, "it followed the rollout over several polls"
    assert page.inner_text("#rollout-status").strip() == "Failed"
    counts = {n: page.inner_text(f"[data-count={n}]") for n in ("succeeded", "failed", "queued", "running")}
    assert counts == {"succeeded": "2", "failed": "1", "queued": "0", "running": "0"}
    failed_row = page.locator("tr.rollout-node[data-status=failed]")
    assert failed_row.locator(".node-link").inner_text() == "failing"
    assert failed_row.locator(".cell-exit").inner_text() == "1"
    tail = page.locator("tr.tail-row:not([hidden])")
    assert tail.count() == 1
    lines = tail.locator("pre span").all_inner_texts()
    assert 0 < len(lines) <= 20 and any("the following units failed" in t for t in lines)
    full_log = tail.locator("a").get_attribute("href")
    assert page.goto(panel.url + full_log).status == 200


def test_the_api_tokens_page_and_the_api_documentation_run_under_the_content_security_policy(panel, page):
    """A token made on its page is shown once; Swagger UI comes from the panel's own static files
    (drf-spectacular-sidecar), with no CDN and no inline code."""
    page.click("text=API tokens")
    page.fill("input[name=name]", "browser script")
    page.click("text=Create token")
    secret = page.inner_text(".token-secret")
    assert secret.startswith("npt_") and len(secret) == len("npt_") + 8 + 1 + 43
    page.goto(panel.url + "/tokens/")
    assert secret not in page.content() and "browser script" in page.content()
    page.goto(panel.url + "/api/v1/docs/")
    page.wait_for_selector(".opblock", timeout=60_000)
    assert "/api/v1/deployments/{id}/log/stream/" in page.content()


def test_the_difference_is_shown_first_and_confirming_switches_to_exactly_that_system(panel, page):
    page.goto(panel.url + "/nodes/devm/")
    assert page.is_checked("#id_diff"), "the difference first is the default"
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    diff_url = page.url
    # The page shows the difference by itself once it has been computed (it reloads when the run ends).
    page.wait_for_selector("#diff", timeout=120_000)
    assert "Succeeded" in page.inner_text("#status")
    diff_text = page.inner_text("#diff")
    assert " added, " in diff_text and " changed" in diff_text
    built = page.inner_text("[data-field=toplevel]").strip()
    assert built.startswith("/nix/store/")
    page.click("#confirm-button")
    page.wait_for_url(lambda url: url != diff_url and "/deployments/" in url)
    wait_js(page, "document.body.dataset.logState === 'complete'", timeout=120)
    assert "Succeeded" in page.inner_text("#status")
    assert "activation of a confirmed difference" in page.inner_text("#change").lower()
    assert page.inner_text("[data-field=system_after]").strip() == built
    page.goto(diff_url)
    assert page.query_selector("#confirm-button") is None, "confirmed once"
