"""The wheel: built with ``python -m build``, installed into a clean environment, run from there.

The environment is pipx's when pipx is installed (scripts/test installs Debian's), else a fresh
venv with pip; either way nothing of the source tree is on its path, and the relay is started in
an empty folder. It must answer a TLS client with a Digest challenge, serve its admin page from
the templates and static files inside the wheel, and say its version.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port, stop_process, tail, wait_for_port

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 120.0  # an isolated build fetches setuptools; a broken one stops here
INSTALL_TIMEOUT = 180.0  # the wheel's dependencies come from the package index (or pip's cache)
START_TIMEOUT = 20.0
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path  # the folder with the installed `rendezvous` command
    python: Path  # the clean environment's interpreter
    how: str  # "pipx" or "venv"
    workdir: Path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points into the source tree."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def run(args: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        BUILD_TIMEOUT, cwd=work, env=clean_env())
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    pipx = shutil.which("pipx")
    if pipx is not None:
        env = clean_env(PIPX_HOME=str(work / "pipx"), PIPX_BIN_DIR=str(work / "bin"))
        run([pipx, "install", "--python", sys.executable, str(wheel)], INSTALL_TIMEOUT,
            cwd=work, env=env)
        python = work / "pipx" / "venvs" / PROJECT["name"] / "bin" / "python"
        yield Installed(wheel, work / "bin", python, "pipx", work)
    else:
        venv = work / "venv"
        run([sys.executable, "-m", "venv", str(venv)], 60.0, cwd=work, env=clean_env())
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
            INSTALL_TIMEOUT, cwd=work, env=clean_env())
        yield Installed(wheel, venv / "bin", venv / "bin" / "python", "venv", work)


def test_wheel_contents(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    templates = {p.name for p in (REPO / "src/rendezvous/admin/templates").glob("*.html")}
    statics = {p.name for p in (REPO / "src/rendezvous/admin/static").iterdir()}
    assert templates and statics
    for name in templates:
        assert f"rendezvous/admin/templates/{name}" in names
    for name in statics:
        assert f"rendezvous/admin/static/{name}" in names
    assert "rendezvous/py.typed" in names
    assert not any(name.startswith(("tests/", "bench/", "src/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert "rendezvous = rendezvous.cli:main" in text


def test_installed_package_is_not_the_source_tree(installed: Installed) -> None:
    proc = run([str(installed.python), "-c",
                "import rendezvous.admin.app as a, rendezvous; print(rendezvous.__file__)"],
               30.0, cwd=installed.workdir, env=clean_env())
    location = Path(proc.stdout.strip()).resolve()
    assert location.is_relative_to(installed.workdir.resolve()), location
    assert not location.is_relative_to(REPO.resolve())


def test_version(installed: Installed) -> None:
    proc = run([str(installed.bin / "rendezvous"), "--version"], 30.0, cwd=installed.workdir,
               env=clean_env())
    assert proc.stdout.strip() == f"rendezvous {PROJECT['version']}"


def test_installed_relay_serves(installed: Installed) -> None:
    """``rendezvous serve`` from the clean environment, in an empty folder: TLS and a 401
    Digest challenge on the relay port, the admin page rendered from the wheel's templates."""
    port, admin_port = free_port(), free_port()
    data = installed.workdir / "data"
    log = installed.workdir / "serve.log"
    command = str(installed.bin / "rendezvous")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [command, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
             str(data), "--admin", f"127.0.0.1:{admin_port}"],
            cwd=installed.workdir, env=clean_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port("127.0.0.1", port, START_TIMEOUT, proc)
            wait_for_port("127.0.0.1", admin_port, START_TIMEOUT, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{tail(log)}") from None
        context = ssl.create_default_context(cafile=str(data / "cert.pem"))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"WWW-Authenticate: Digest" in answer

        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/", timeout=10) as page:
            html = page.read().decode()
        assert page.status == 200 and "<html" in html.lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/static/admin.css",
                                    timeout=10) as css:
            assert css.status == 200
            assert css.read() == (REPO / "src/rendezvous/admin/static/admin.css").read_bytes()
    finally:
        stop_process(proc)
    assert proc.returncode == 0, tail(log)
