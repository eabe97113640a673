"""The turn inspector page (GET /admin): its headers, and the page itself driven in a real headless
browser (Debian's chromium through Playwright): sign in, a served turn listed and opened with its
candidates and scores, client markup shown as text. A screenshot is kept as a test artifact in
$TURNGATE_TEST_ARTIFACTS (default test-artifacts/ in the checkout)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from service.gate.decisions import Decision
from service.gate.record import CandidateRecord
from tests.inspector_support import ADMIN, CLIENT_A, N, chat, key_id, numbered_choices, store_gateway, wait_stored
from tests.test_admin_turns import write_records
from tests.test_store_support import record

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TURNGATE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM = shutil.which("chromium")
XSS = '<img src=x onerror="window.__xss = 1; alert(1)"><script>window.__xss = 2</script>'


@pytest.fixture
def inspector(actor, scripted, tmp_path) -> Iterator[str]:
    scripted.fn = numbered_choices
    _, actor_url = actor
    with store_gateway(actor_url, f"sqlite:///{tmp_path}/store.db", tmp_path / "spool") as (base, _):
        yield base


needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="chromium is not installed (Debian: apt-get install chromium)")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_served_with_a_strict_policy_and_no_caching(inspector):
    got = httpx.get(inspector + "/admin")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in got.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    # The inline script and style are allowed by their hashes, and nothing else is.
    (script,) = re.findall(r"<script>(.*?)</script>", got.text, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", got.text, re.S)
    assert csp["script-src"] == _csp_hash(script) and csp["style-src"] == _csp_hash(style)
    assert got.headers["cache-control"] == "no-store" and got.headers["x-content-type-options"] == "nosniff"
    # Self-contained: nothing is loaded from anywhere (no src= or href= to fetch), and the key is kept
    # in the tab's session storage only.
    assert not re.search(r"\b(src|href)=", got.text)
    assert "sessionStorage" in script and "localStorage" not in script
    assert all(f'<option value="{d.value}">' in got.text for d in Decision)
    # Not part of the API document.
    assert "/admin" not in httpx.get(inspector + "/openapi.json").json()["paths"]


def _sign_in(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#signin-form button[type=submit]")


@needs_chromium
def test_the_inspector_in_a_headless_browser(inspector):
    turn_id = chat(inspector, "where is my order?")
    xss_id = chat(inspector, "echo:" + XSS)
    wait_stored(inspector, turn_id)
    wait_stored(inspector, xss_id)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "admin-inspector-turn.png"
    shot.unlink(missing_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            blocked: list[str] = []
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(inspector + "/admin")

            # A wrong key is refused and nothing is kept.
            _sign_in(page, "not-the-key")
            expect(page.locator("#signin-error")).to_have_text("invalid admin key")
            assert page.evaluate("sessionStorage.length") == 0

            _sign_in(page, ADMIN)
            row = page.locator(f'tr[data-turn-id="{turn_id}"]')
            expect(row).to_be_visible()
            expect(page.locator(f'tr[data-turn-id="{xss_id}"]')).to_be_visible()
            expect(page.locator("#stats .tile").first).to_contain_text("2")
            assert page.evaluate("sessionStorage.getItem('turngate.adminKey')") == ADMIN
            assert page.evaluate("localStorage.length") == 0
            expect(row).to_contain_text("where is my order?")
            expect(row).to_contain_text("answer 1")  # the chosen reply
            page.screenshot(path=str(ARTIFACTS / "admin-inspector-list.png"), full_page=True)

            row.click()
            cards = page.locator("#detail .cand")
            expect(cards).to_have_count(N)
            expect(page.locator("#detail")).to_contain_text("Turn " + turn_id)
            expect(page.locator("#detail .cand.chosen")).to_have_count(1)
            chosen = page.locator("#detail .cand.chosen")
            expect(chosen).to_have_attribute("data-index", "1")
            expect(chosen.locator(".score")).to_have_text("0.900")
            expect(chosen).to_contain_text("answer 1")
            assert [cards.nth(i).locator(".score").inner_text() for i in range(N)] == ["0.200", "0.900", "0.550"]
            expect(chosen.locator(".contrib")).to_contain_text("length")  # the top feature contributions
            expect(page.locator("#detail")).to_contain_text("ranked")
            page.screenshot(path=str(shot), full_page=True)

            # Client markup is text: nothing runs, no image is even requested.
            page.click("#back")
            xss_row = page.locator(f'tr[data-turn-id="{xss_id}"]')
            expect(xss_row).to_contain_text("<img src=x onerror=")
            xss_row.click()
            expect(page.locator("#detail .cand")).to_have_count(N)
            expect(page.locator("#detail .cand.chosen")).to_contain_text(XSS)
            expect(page.locator("#detail .msg.user")).to_contain_text(XSS)
            page.screenshot(path=str(ARTIFACTS / "admin-inspector-xss.png"), full_page=True)
            assert page.locator("img").count() == 0 and page.locator("#detail script").count() == 0
            assert page.evaluate("window.__xss") is None and dialogs == []
            assert blocked == []  # the page's own script and style ran under its policy

            # Signing out forgets the key.
            page.click("#signout")
            expect(page.locator("#signin")).to_be_visible()
            assert page.evaluate("sessionStorage.length") == 0
            expect(page.locator("#turns tbody tr")).to_have_count(0)  # nothing seen under the key stays
        finally:
            browser.close()
    assert shot.stat().st_size > 0


@needs_chromium
def test_an_intervened_turn_opened_by_its_address_shows_its_rounds_vetoes_and_feedback(inspector, tmp_path):
    r = record([{"role": "user", "content": "cancel order 9"}], "cancelled", n=4, key_id=key_id(CLIENT_A))
    veto = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "cancel", "arguments": "{bad json"}}]}
    r.candidates = [
        CandidateRecord(index=0, round=0, message=veto, verdict="veto", veto_reason="bad_json",
                        veto_detail="arguments are not JSON"),
        CandidateRecord(index=1, round=0, message={"role": "assistant", "content": "maybe later"}, score=0.1),
        CandidateRecord(index=2, round=1, message={"role": "assistant", "content": "cancelled"}, score=0.8),
        CandidateRecord(index=3, round=1, message={"role": "assistant", "content": "done?"}, score=0.4)]
    r.decision, r.rounds, r.chosen_index = "intervened", 2, 2
    r.feedback = ["Your previous replies were judged unlikely to help: call the tool with valid JSON."]
    write_records(f"sqlite:///{tmp_path}/store.db", tmp_path / "writer-spool", [r])
    given = httpx.post(inspector + "/v1/feedback", json={"turn_id": r.turn_id, "reward": 1.0, "label": "resolved"},
                       headers={"authorization": f"Bearer {CLIENT_A}"})
    assert given.status_code == 200, given.text

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{inspector}/admin#turn={r.turn_id}")
            _sign_in(page, ADMIN)
            detail = page.locator("#detail")
            expect(detail).to_contain_text("Turn " + r.turn_id)  # straight to the turn the address names
            rounds = detail.locator(".cands")
            expect(rounds).to_have_count(2)
            expect(rounds.nth(0).locator(".cand")).to_have_count(2)
            expect(rounds.nth(1).locator(".cand")).to_have_count(2)
            expect(rounds.nth(0).locator(".cand.vetoed")).to_contain_text("veto: bad_json")
            expect(rounds.nth(0).locator(".cand.vetoed")).to_contain_text("arguments are not JSON")
            expect(rounds.nth(0).locator(".cand.vetoed")).to_contain_text("{bad json")
            expect(rounds.nth(1).locator(".cand.chosen")).to_contain_text("cancelled")
            expect(detail.locator(".intervention")).to_contain_text("call the tool with valid JSON")
            expect(detail).to_contain_text("intervened")
            expect(detail.locator(".fb")).to_contain_text("resolved")
            expect(detail.locator(".fb")).to_contain_text("reward 1.00")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "admin-inspector-intervened.png"), full_page=True)
        finally:
            browser.close()
