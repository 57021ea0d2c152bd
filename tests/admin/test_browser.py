"""The admin page driven in a real headless Chromium, next to a real relay.

An operator adds a hidden server, downloads its provisioning file, a hidden server parks with
that file and shows up on the open page without a reload, the secret is rotated (the old file
stops working, the new one parks), and the entry is removed. Screenshots of each step go to
artifacts/screenshots/ (one at a phone's size).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from admin_support import admin_config, connect_as
from browser_support import chromium
from harness import PARKED, ServerThread, running_server
from playwright.sync_api import Browser, Page, expect
from revocation_support import REVOKED_WITHIN, closed_by_relay

from rendezvous.provisioning import Provisioning, load_provisioning

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
# The page polls every 2 s: a change shows within one poll and a bit.
LIVE_TIMEOUT_MS = 6000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def download_file(page: Page, folder: Path, name: str) -> Provisioning:
    """Click the page's download link; the provisioning file it saves, read and checked."""
    with page.expect_download() as info:
        page.click("#download")
    target = folder / name
    info.value.save_as(target)
    return load_provisioning(target)


def row(page: Page, uuid: str) -> str:
    return f'tr[data-id="{uuid}"]'


def test_provision_watch_rotate_and_remove(tmp_path: Path, browser: Browser) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path)) as s, ExitStack() as sockets:
        context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
        context.set_default_timeout(10_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        base = s.admin_url()

        # An empty registry.
        page.goto(base + "/")
        expect(page.get_by_text("No hidden servers yet")).to_be_visible()
        shot(page, "01-empty")

        # Add one: the next page offers its provisioning file and a QR code.
        page.fill("input[name=label]", "living-room hub")
        page.fill("input[name=step]", "30")
        page.select_option("select[name=digits]", "8")
        page.click("form.add button[type=submit]")
        page.wait_for_url("**/entry?id=*")
        uuid = page.inner_text("#entry-id")
        expect(page.locator(".flash-ok")).to_contain_text("living-room hub")
        assert page.evaluate("document.getElementById('qr').naturalWidth") > 0, "QR not loaded"
        shot(page, "02-created")
        prov = download_file(page, tmp_path, "first.json")
        assert (prov.uuid, prov.label, prov.digits, prov.step) == (uuid, "living-room hub", 8, 30)
        assert (prov.host, prov.port) == ("127.0.0.1", s.port)
        assert prov.ca_pem and "BEGIN CERTIFICATE" in prov.ca_pem
        shown = json.loads(page.inner_text("#document"))
        assert shown["authParams"]["base32"] == prov.base32

        # The list, open in the browser; a hidden server parks with the downloaded file and
        # appears as parked without a reload.
        page.goto(base + "/")
        page.evaluate("window.notReloaded = true")
        entry_row = page.locator(row(page, uuid))
        expect(entry_row.locator('[data-field="parked"]')).to_have_text("0")
        sock, answer = connect_as(prov)
        sockets.enter_context(sock)
        assert answer == PARKED
        expect(entry_row.locator('[data-field="parked"]')).to_have_text(
            "1", timeout=LIVE_TIMEOUT_MS)
        expect(page.locator('[data-stat="parked"]')).to_have_text("1")
        expect(entry_row.locator('[data-field="last_seen"]')).to_contain_text("s ago")
        assert page.evaluate("window.notReloaded") is True
        shot(page, "03-parked-live")

        # The search box filters rows as one types.
        page.fill("#search", "no such server")
        expect(entry_row).to_be_hidden()
        expect(page.locator("#no-match")).to_be_visible()
        page.fill("#search", "LIVING")
        expect(entry_row).to_be_visible()
        page.fill("#search", "")

        # Rotate, after a confirmation: a new file; the connection parked with the old one is
        # closed and the old one no longer parks; the new one does.
        entry_row.get_by_role("link", name="Rotate").click()
        expect(page.locator("#confirm-title")).to_contain_text("Rotate the secret")
        shot(page, "04-rotate-confirm")
        page.click("#confirm")
        page.wait_for_url("**/entry?id=*")
        expect(page.locator(".flash-ok")).to_contain_text("New secret")
        shot(page, "05-rotated")
        rotated = download_file(page, tmp_path, "rotated.json")
        assert rotated.uuid == uuid and rotated.base32 != prov.base32
        assert closed_by_relay(sock, REVOKED_WITHIN)
        stale, answer = connect_as(prov)
        sockets.enter_context(stale)
        assert answer.startswith(b"HTTP/1.1 401"), answer
        fresh, answer = connect_as(rotated)
        sockets.enter_context(fresh)
        assert answer == PARKED

        # The list shows the one connection parked now and the refused CONNECT: on a phone too.
        page.goto(base + "/")
        expect(entry_row.locator('[data-field="parked"]')).to_have_text("1")
        expect(page.locator("#rejections")).to_contain_text("wrong token")
        phone = context.new_page()
        phone.set_viewport_size(PHONE)
        phone.goto(base + "/")
        phone_row = phone.locator(row(phone, uuid))
        expect(phone_row).to_be_visible()
        # Cards, not a table: each row is a block, and the page does not scroll sideways.
        assert phone_row.evaluate("r => getComputedStyle(r).display") == "block"
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        shot(phone, "06-phone")
        phone.close()

        # Remove, after a confirmation: gone from the list, and its file no longer parks.
        entry_row.get_by_role("link", name="Remove").click()
        expect(page.locator("#confirm-title")).to_contain_text("Remove")
        shot(page, "07-remove-confirm")
        page.click("#confirm")
        page.wait_for_url(base + "/")
        expect(page.locator(".flash-ok")).to_contain_text(f"Removed {uuid}")
        expect(page.locator(row(page, uuid))).to_have_count(0)
        shot(page, "08-removed")
        gone, answer = connect_as(rotated)
        sockets.enter_context(gone)
        assert answer.startswith(b"HTTP/1.1 401"), answer

        assert not errors, errors
        context.close()
        assert_registry_empty(s)


def assert_registry_empty(s: ServerThread) -> None:
    assert s.call(s.registry.list()) == []


def test_log_in_with_the_password(tmp_path: Path, browser: Browser) -> None:
    config = admin_config(tmp_path, password="correct horse battery staple")
    with running_server(tmp_path, admin=config) as s:
        entry = s.add_entry()
        context = browser.new_context(viewport=PHONE)
        context.set_default_timeout(10_000)
        page = context.new_page()
        page.goto(s.admin_url() + f"/entry?id={entry.uuid}")
        page.wait_for_url("**/login?next=**")
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        expect(page.locator(".flash-error")).to_have_text("Wrong password.")
        shot(page, "09-login-phone")
        page.fill("input[name=password]", "correct horse battery staple")
        page.click("button[type=submit]")
        page.wait_for_url("**/entry?id=*")  # back where the browser was sent from
        expect(page.locator("#entry-id")).to_have_text(entry.uuid)
        shot(page, "10-entry-phone")
        page.click("text=Log out")
        page.wait_for_url("**/login")
        context.close()
