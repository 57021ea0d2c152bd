"""The admin page's rotate and remove close the connections parked under the old secret at once
(the page shares the relay's process and registry object)."""

from __future__ import annotations

import time
from pathlib import Path

import requests
from admin_support import admin_config, csrf_of, get, post
from harness import running_server
from revocation_support import POLL, REVOKED_WITHIN, closed_by_relay, connect_status, visit


def test_the_admin_page_rotate_and_remove_close_parked_connections(tmp_path: Path) -> None:
    with running_server(tmp_path, admin=admin_config(tmp_path), pair_wait=0.3, settle=0.0,
                        registry_poll=POLL) as s:
        rotated, removed = s.add_entry(), s.add_entry()
        parked = {uuid: [s.park(entry) for _ in range(2)]
                  for uuid, entry in ((rotated.uuid, rotated), (removed.uuid, removed))}
        base = s.admin_url()
        with requests.Session() as client:
            token = csrf_of(get(client, base + "/").text)
            for action, entry in (("/rotate", rotated), ("/remove", removed)):
                start = time.monotonic()
                answer = post(client, base + action, {"id": entry.uuid, "csrf": token})
                assert answer.status_code == 303
                for sock in parked[entry.uuid]:
                    assert closed_by_relay(sock,
                                           max(0.0, start + REVOKED_WITHIN - time.monotonic()))
                    sock.close()
                assert s.parked(entry.uuid) == 0
                assert visit(s, entry).status_code == 404
                assert connect_status(s, entry) == b"HTTP/1.1 401"
            page = get(client, base + "/entry", params={"id": rotated.uuid}).text
            assert "closed" in page
