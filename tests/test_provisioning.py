"""Provisioning files (docs/protocol.md §5): their exact shape, their mode, reading them back."""

from __future__ import annotations

import copy
import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rendezvous.errors import ProvisioningError
from rendezvous.provisioning import (
    Provisioning,
    load_provisioning,
    provisioning_document,
    write_provisioning,
)
from rendezvous.registry import Entry, new_secret

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def entry() -> Entry:
    return Entry(
        uuid="2f402f80-da50-11e1-9b23-000000000001",
        base32=new_secret(),
        step=60,
        digits=8,
        label="living-room hub",
    )


def test_document_has_the_protocol_field_names() -> None:
    e = entry()
    doc = provisioning_document(e, "rendezvous.example.com", 8899, CA)
    assert doc == {
        "uuid": e.uuid,
        "label": "living-room hub",
        "server": {"host": "rendezvous.example.com", "port": 8899, "ca": CA},
        "authParams": {"base32": e.base32, "step": 60, "digits": 8},
    }


@pytest.mark.parametrize("version", [1, 2])
def test_the_proxy_option_is_in_the_file_only_when_set(tmp_path: Path, version: int) -> None:
    assert "proxyProtocol" not in provisioning_document(entry(), "h", 1, None)
    doc = provisioning_document(replace(entry(), proxy_protocol=version), "h", 1, None)
    assert doc["proxyProtocol"] == version
    path = tmp_path / "hub.json"
    write_provisioning(doc, path)
    assert load_provisioning(path).proxy_protocol == version


def test_an_entrys_own_relay_address_wins_in_its_file() -> None:
    own = replace(entry(), server_host="hub-relay.example.com")
    assert provisioning_document(own, "relay.example.com", 8899, None)["server"] == {
        "host": "hub-relay.example.com", "port": 8899}
    both = replace(own, server_port=443)
    assert provisioning_document(both, "relay.example.com", 8899, None)["server"] == {
        "host": "hub-relay.example.com", "port": 443}


def test_ca_is_omitted_when_none() -> None:
    doc = provisioning_document(entry(), "relay.example.com", 443, None)
    assert doc["server"] == {"host": "relay.example.com", "port": 443}


@pytest.mark.parametrize("ca", [CA, None])
def test_written_file_reads_back_and_is_private(tmp_path: Path, ca: str | None) -> None:
    e = entry()
    path = tmp_path / "provision" / "hub.json"
    write_provisioning(provisioning_document(e, "relay.example.com", 8899, ca), path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_provisioning(path) == Provisioning(
        uuid=e.uuid,
        label=e.label,
        host="relay.example.com",
        port=8899,
        ca_pem=ca,
        base32=e.base32,
        step=60,
        digits=8,
    )
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_rewriting_replaces_a_wider_mode(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    path.write_text("{}")
    path.chmod(0o644)
    write_provisioning(provisioning_document(entry(), "h", 1, None), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_provisioning(path).host == "h"


def test_unwritable_place_is_a_provisioning_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ProvisioningError, match="cannot write provisioning file"):
        write_provisioning({}, blocker / "hub.json")


def test_original_style_auth_params_get_defaults(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    doc = {
        "uuid": "abc",
        "server": {"host": "h", "port": 8899},
        "authParams": {"base32": "JBSWY3DP"},
    }
    path.write_text(json.dumps(doc))
    loaded = load_provisioning(path)
    assert (loaded.label, loaded.ca_pem, loaded.step, loaded.digits) == ("", None, 30, 6)
    assert loaded.proxy_protocol == 0
    path.write_text(json.dumps({**doc, "proxyProtocol": None}))
    assert load_provisioning(path).proxy_protocol == 0


def _without(doc: dict[str, Any], dotted: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    target = doc
    for key in parents:
        target = target[key]
    del target[last]
    return doc


@pytest.mark.parametrize(
    "field", ["uuid", "server", "server.host", "server.port", "authParams", "authParams.base32"]
)
def test_missing_field_is_named(tmp_path: Path, field: str) -> None:
    path = tmp_path / "p.json"
    full = provisioning_document(entry(), "h", 8899, None)
    path.write_text(json.dumps(_without(full, field)))
    with pytest.raises(ProvisioningError, match=f"missing field {field}") as info:
        load_provisioning(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("server.port", True, "server.port must be an integer"),
        ("server.port", "8899", "server.port must be an integer"),
        ("server.port", 0, "server.port must be an integer"),
        ("server.host", "", "server.host must be a non-empty string"),
        ("server.ca", "hello", "server.ca must be a PEM certificate"),
        ("authParams.digits", 5, "authParams.digits must be an integer from 6 to 8"),
        ("authParams.step", 0, "authParams.step must be an integer"),
        ("authParams.base32", "not base32!", "not a base32 secret"),
        ("label", 7, "label must be a string"),
        ("proxyProtocol", 3, "proxyProtocol must be an integer from 0 to 2"),
        ("proxyProtocol", "2", "proxyProtocol must be an integer from 0 to 2"),
        ("proxyProtocol", True, "proxyProtocol must be an integer from 0 to 2"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, dotted: str, value: Any, message: str) -> None:
    doc = provisioning_document(entry(), "h", 8899, None)
    *parents, last = dotted.split(".")
    target = doc
    for key in parents:
        target = target[key]
    target[last] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProvisioningError, match=message):
        load_provisioning(path)


def test_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="cannot read provisioning file"):
        load_provisioning(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProvisioningError, match="not valid JSON"):
        load_provisioning(bad)
    bad.write_text("[]")
    with pytest.raises(ProvisioningError, match="must be a JSON object"):
        load_provisioning(bad)
