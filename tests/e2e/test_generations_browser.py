"""The node page's generations in a real browser, under the Content-Security-Policy: read them from the
node, roll back with a click, watch the rollback's log to its end (daphne, qcluster, a testbed node)."""

from __future__ import annotations

import pytest

from tests.e2e.test_browser import page, wait_js  # noqa: F401  (the signed-in page fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def finished(page) -> str:  # noqa: F811
    page.wait_for_url("**/deployments/*/")
    wait_js(page, "document.body.dataset.logState === 'complete'", timeout=120)
    return page.inner_text("#status")


def test_reading_the_generations_and_rolling_back_with_a_click(panel, page):  # noqa: F811
    node = panel.url + "/nodes/devm/"
    page.goto(node)
    page.uncheck("#id_diff")  # a plain deploy: no difference shown first (the page reloads when a diff ends)
    page.click("#deploy-button")
    assert "Succeeded" in finished(page)

    page.goto(node)
    page.click("#read-generations")
    page.wait_for_selector("#generations-table")
    numbers = page.eval_on_selector_all(
        "#generations-table tr[data-generation]", "rs => rs.map(r => r.dataset.generation)"
    )
    assert numbers[-1] == "1" and len(numbers) >= 2  # newest first; 1 is the testbed's initial system
    newest = page.locator(f'tr[data-generation="{numbers[0]}"]')
    assert "running" in newest.inner_text() and "boot default" in newest.inner_text()
    assert "not the panel" in page.locator('tr[data-generation="1"]').inner_text()

    page.click('button[aria-label="Switch to generation 1"]')
    assert "Succeeded" in finished(page)
    assert "switching profile from version" in page.inner_text("#log")
    assert page.inner_text("#rollback-target").startswith("generation 1")

    page.goto(node)
    page.click("#read-generations")
    page.wait_for_selector("#generations-table")
    assert "running" in page.locator('tr[data-generation="1"]').inner_text()
