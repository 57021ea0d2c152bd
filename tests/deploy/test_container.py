"""deploy/Containerfile and deploy/compose.yaml, checked without a container engine.

Containers cannot be started on this machine (no daemon, no user namespaces), so these tests
read the files the way an engine would and check what can be checked here: every COPY source
exists in the build context and survives .dockerignore, the entry point is the package's
command, every command line parses with the real CLI parser, the compose services refer to each
other (Redis host, advertised addresses, volumes, build context) consistently.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from rendezvous.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
RELAYS = ("relay-a", "relay-b", "relay-c")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore leaves ``relative`` out of the build context (its last matching
    pattern decides; ``!`` patterns put files back)."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern.replace("**/", "*")) for p in prefixes):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------- Containerfile


def test_containerfile_bases_are_slim_python() -> None:
    bases = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"(docker\.io/library/)?python:3\.1[1-9]-slim(-\w+)?", base), base


def test_containerfile_copies_real_paths() -> None:
    copies = [args for word, args in instructions() if word == "COPY"]
    assert copies
    for args in copies:
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
            assert not dockerignored(source), f"COPY {source}: left out by .dockerignore"
    for needed in ("src/rendezvous/cli.py", "src/rendezvous/admin/templates/base.html"):
        assert not dockerignored(needed), needed
    assert dockerignored(".venv") and dockerignored("tests/conftest.py")


def test_containerfile_runs_the_package_command() -> None:
    steps = instructions()
    entrypoint = exec_form(next(a for w, a in steps if w == "ENTRYPOINT"))
    command = exec_form(next(a for w, a in steps if w == "CMD"))
    assert entrypoint == ["rendezvous"] and "rendezvous" in SCRIPTS
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    exposed = [int(a) for w, a in steps if w == "EXPOSE"]
    assert exposed == [args.port]
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_containerfile_data_volume() -> None:
    steps = instructions()
    env = dict(word.split("=", 1) for w, a in steps if w == "ENV" for word in shlex.split(a))
    assert [a for w, a in steps if w == "VOLUME"] == [env["RENDEZVOUS_DATA_DIR"]]
    # Memory is the relay's business (--malloc-trim-interval): no allocator swapped in.
    assert "LD_PRELOAD" not in env


# ---------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) are resolved here
    assert isinstance(document, dict)
    return document


def substitute(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set; ``${VAR:?message}`` must stay required."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    assert "${" not in text, text
    return text


def serve_args(service: dict[str, Any]) -> Any:
    command = [substitute(word) for word in service["command"]]
    return build_parser().parse_args(command)


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "cert", *RELAYS}
    assert services["redis"]["image"].split("/")[-1].startswith("redis:")
    for name in (*RELAYS, "cert"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).resolve() == CONTAINERFILE
        assert services[name]["image"] == services["relay-a"]["image"]


def test_compose_relays_form_one_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    node_ids, published = set(), set()
    for name in RELAYS:
        service = services[name]
        args = serve_args(service)
        assert args.command == "serve"
        cluster = urlsplit(args.cluster)
        registry = urlsplit(service["environment"]["RENDEZVOUS_REGISTRY"])
        assert cluster.hostname == registry.hostname == "redis"
        assert cluster.path != registry.path  # the registry and the cluster state: two DBs
        node_ids.add(args.node_id)
        host, port = args.advertise.rsplit(":", 1)
        assert host == name  # other nodes dial the service name on the compose network
        assert args.internal.rsplit(":", 1)[1] == port
        (mapping,) = service["ports"]
        outside, inside = mapping.split(":")
        assert int(inside) == args.port
        published.add(outside)
        assert "RENDEZVOUS_CLUSTER_KEY" in service["environment"]
        # ${VAR:?message}: compose refuses to start without the key.
        assert ":?" in service["environment"]["RENDEZVOUS_CLUSTER_KEY"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["cert"]["condition"] == "service_completed_successfully"
        assert int(service["ulimits"]["nofile"]["soft"]) >= args.max_connections + 64
    assert len(node_ids) == len(RELAYS) and len(published) == len(RELAYS)


def test_compose_cert_service_makes_the_shared_certificate(compose: dict[str, Any]) -> None:
    cert = compose["services"]["cert"]
    (script,) = cert["command"]
    assert cert["entrypoint"] == ["sh", "-c"]
    guard, _, command = substitute(script).partition(" || exec ")
    data = "/var/lib/rendezvous"
    assert guard == f"test -f {data}/cert.pem"
    words = shlex.split(command)
    assert words[0] == "rendezvous"
    args = build_parser().parse_args(words[1:])
    assert args.command == "cert" and str(args.out_dir) == data


def test_compose_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = {mount.split(":")[0] for service in compose["services"].values()
            for mount in service.get("volumes", [])}
    assert used == declared
    for name in (*RELAYS, "cert"):
        assert "relay-data:/var/lib/rendezvous" in compose["services"][name]["volumes"]
