"""The shape of server/: no import cycle (TYPE_CHECKING and function-level imports included),
and a lone relay or an agent imports no cluster machinery."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rendezvous.server

SERVER = Path(rendezvous.server.__file__).parent


def server_imports(path: Path) -> set[str]:
    """The ``rendezvous.server`` modules ``path`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if (SERVER / f"{name.rsplit('.', 1)[-1]}.py").exists()
                  and name.startswith("rendezvous.server.")}
    return found


def test_server_modules_import_each_other_one_way_only() -> None:
    graph = {f"rendezvous.server.{path.stem}": server_imports(path)
             for path in SERVER.glob("*.py") if path.stem != "__init__"}
    assert graph["rendezvous.server.hub"] <= {"rendezvous.server.ratelimit"}
    # The cluster knows nothing of hubs or connections; its links are plain asyncio.
    assert graph["rendezvous.server.cluster"] <= {"rendezvous.server.links"}
    assert not graph["rendezvous.server.links"]
    assert "rendezvous.server.cluster" not in graph["rendezvous.server.connection"]

    def visit(module: str, path: tuple[str, ...]) -> None:
        for target in graph.get(module, ()):
            assert target not in path, " -> ".join((*path, target))
            visit(target, (*path, target))

    for module in graph:
        visit(module, (module,))


@pytest.mark.parametrize(("module", "absent"), [
    ("rendezvous.server.app", ["redis", "rendezvous.server.cluster"]),
    ("rendezvous.agent.hidden", ["redis", "rendezvous.server"]),
    ("rendezvous.agent.mobile", ["redis", "rendezvous.server"]),
    ("rendezvous.runtime", ["rendezvous.server", "rendezvous.agent"]),
])
def test_imports_stay_light(module: str, absent: list[str]) -> None:
    code = (f"import sys, {module}; "
            f"print(','.join(name for name in {absent!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "", f"{module} imported {done.stdout.strip()}"


def test_the_hidden_command_loads_no_server_code(tmp_path: Path) -> None:
    # `rendezvous hidden` up to reading its file (missing here, so it stops there).
    args = ["hidden", "--config", str(tmp_path / "missing.json"), "--forward", "127.0.0.1:9"]
    code = ("import contextlib, sys, rendezvous.cli as cli\n"
            "with contextlib.suppress(SystemExit):\n"
            f"    cli.main({args!r})\n"
            "print('loaded', ','.join(n for n in ('redis', 'rendezvous.server') "
            "if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert "missing.json" in done.stderr  # it did get as far as the file
    assert done.stdout.strip() == "loaded", done.stdout
