"""Named hidden servers in a real headless Chromium: the admin page makes a named entry and
shows its visitor URL and QR code; the browser opens that URL with no login prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import chromium
from harness import HiddenHTTPService, ServerThread
from named_support import DOMAIN, wildcard_certificate
from playwright.sync_api import Browser, expect

from rendezvous.config import AdminConfig, Limits, RelayAddress, ServerConfig
from rendezvous.tls import read_cert_pem

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Every name under the test domain is this machine, as a wildcard DNS record would say.
    with chromium(f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1") as launched:
        yield launched


def test_admin_names_an_entry_and_a_browser_opens_its_url(tmp_path: Path,
                                                          browser: Browser) -> None:
    tls = wildcard_certificate(tmp_path)
    config = ServerConfig(host="127.0.0.1", port=0, tls=tls, registry_url="memory://",
                          limits=Limits(pair_wait=2.0), domain=DOMAIN,
                          admin=AdminConfig(
                              host="127.0.0.1", port=0, domain=DOMAIN,
                              relay=RelayAddress("127.0.0.1", None,
                                                 read_cert_pem(tls.cert_file))))
    server = ServerThread(config)
    try:
        # The test CA is trusted by ignoring certificate errors (it is self-signed).
        context = browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(10_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        page.goto(server.admin_url() + "/")
        page.fill("input[name=label]", "garden")
        page.fill("input[name=name]", "Hub")
        page.click("form.add button[type=submit]")
        page.wait_for_url("**/entry?id=*")
        uuid = page.inner_text("#entry-id")
        url = f"https://hub.{DOMAIN}:{server.port}/"
        expect(page.locator("#entry-name")).to_have_text("hub")
        expect(page.locator("#visitor-url")).to_have_text(url)
        assert page.evaluate("document.getElementById('visitor-qr').naturalWidth") > 0, \
            "visitor QR code not rendered"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "names-entry.png"), full_page=True)
        svg = page.request.get(server.admin_url() + f"/visitor-qr.svg?id={uuid}")
        assert svg.status == 200 and svg.headers["content-type"].startswith("image/svg+xml")
        assert "<title>visitor URL</title>" in svg.text()

        # The list shows the URL too.
        page.goto(server.admin_url() + "/")
        expect(page.locator(f'tr[data-id="{uuid}"] a.visitor-url')).to_have_text(url)

        # A second entry may not take the name.
        page.fill("input[name=name]", "hub")
        with page.expect_response("**/create") as created:
            page.click("form.add button[type=submit]")
        assert created.value.status == 409

        entry = server.call(server.registry.get(uuid))
        assert entry is not None and entry.name == "hub"
        with HiddenHTTPService(server, entry, parked=2) as hidden:
            answer = page.goto(url + "kitchen?lights=on")
            assert answer is not None and answer.status == 200, answer and answer.text()
            seen = json.loads(page.inner_text("body"))
            assert seen["path"] == "/kitchen?lights=on"
            assert dialogs == [] and errors == []
            page.screenshot(path=str(SCREENSHOTS / "names-visitor.png"))
        host = hidden.requests[0].header("Host") if hidden.requests else None
        assert host == f"hub.{DOMAIN}:{server.port}"

        # An unknown name: the relay's 404 JSON, in the browser too.
        missing = page.goto(f"https://nobody.{DOMAIN}:{server.port}/")
        assert missing is not None and missing.status == 404
        context.close()
    finally:
        server.stop()
