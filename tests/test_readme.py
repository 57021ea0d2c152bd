"""The README to the letter: every command block and Python snippet runs as written.

Each fenced block of README.md is either prose (```text, ```json) or code (```sh, ```python), and
every code block carries a marker, an HTML comment on the line before it:

    <!-- readme-test: run -->                   run it; it must succeed within RUN_TIMEOUT
    <!-- readme-test: run, expect "TEXT" -->     ... and print TEXT
    <!-- readme-test: start, ready "TEXT" -->    a command that keeps running (the relay, an
                                                 agent): start it, go on once it prints TEXT
    <!-- readme-test: skip: REASON -->           not run here (another machine, the suite itself)

A code block without a marker, a marker the test does not know, or a language it cannot run fails
the test, so a new block is never silently left out.

The blocks run in their order in a scratch folder laid out like a fresh clone (``scripts/serve``,
``.venv``, ``.gitignore``, under git), with every port the README names replaced by a free one, as
a reader would run them in terminals opened in the repository's folder: each block in a new bash
(variables a block sets are seen by later blocks, like a terminal that stays open). Afterwards
everything the walkthrough left in the folder must be ignored by git.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
from support import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# Generous bounds for a loaded machine; the whole walkthrough takes a few seconds.
RUN_TIMEOUT = 20.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

# Every port the README's runnable blocks name; each is replaced by a free one. A 4- or 5-digit
# number in such a block that is not listed here fails the test (it could be a real port).
PORTS = (8899, 8000, 8080, 8799, 8798, 8797, 8900, 8901, 8902, 8123)
# Redis's default port: replaced by the test session's redis-server.
REDIS_PORT = 6379
# The cluster block's Redis databases, emptied before and after it.
REDIS_DATABASES = (0, 1)

MARKER = re.compile(r"^<!-- readme-test: (.*) -->$")
ACTION = re.compile(r'^(?:(run)(?:, expect "([^"]+)")?|(start), ready "([^"]+)"|(skip): (\S.*))$')
FENCE = re.compile(r"^```(.*)$")
PROSE = {"text", "json", "toml"}  # (the relay.toml example is loaded by tests/test_config_file.py)
CODE = {"sh", "python"}
NUMBER = re.compile(r"(?<![\w.])\d{4,5}(?![\w])")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    line: int  # of its opening fence, 1-based
    language: str
    text: str
    action: str  # "run", "start", "skip" or "" (prose)
    expect: str = ""  # run: what it must print; start: what it prints once ready


def read_blocks(markdown: str) -> list[Block]:
    """Every fenced block of ``markdown``, with its marker; AssertionError for a bad one."""
    blocks: list[Block] = []
    lines = markdown.split("\n")
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        start, language = index, fence.group(1).strip()
        end = next((i for i in range(start + 1, len(lines)) if lines[i] == "```"), None)
        assert end is not None, f"README.md:{start + 1}: a fence that is never closed"
        text = "\n".join(lines[start + 1:end]) + "\n"
        where = f"README.md:{start + 1}"
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        if language in PROSE:
            assert marker is None, f"{where}: a ```{language} block is not run; drop its marker"
            blocks.append(Block(start + 1, language, text, ""))
        else:
            assert language in CODE, (
                f"{where}: ```{language or '(no language)'} is neither code the test can run "
                f"({', '.join(sorted(CODE))}) nor prose ({', '.join(sorted(PROSE))})")
            assert marker is not None, (
                f"{where}: a ```{language} block with no <!-- readme-test: ... --> marker on the "
                "line before it (run, start or skip; see tests/test_readme.py)")
            action = ACTION.match(marker.group(1))
            assert action is not None, f"{where}: unknown marker {marker.group(1)!r}"
            run, expect, begin, ready, skip, _reason = action.groups()
            kind = run or begin or skip
            assert not (kind == "start" and language != "sh"), f"{where}: only sh blocks start"
            blocks.append(Block(start + 1, language, text, kind, expect or ready or ""))
        index = end + 1
    return blocks


def test_every_block_is_marked_or_prose() -> None:
    blocks = read_blocks(README.read_text())
    assert [b for b in blocks if b.action in ("run", "start")], "nothing of the README runs"


def test_the_marker_rules_catch_a_forgotten_block() -> None:
    with pytest.raises(AssertionError, match="no <!-- readme-test"):
        read_blocks("text\n```sh\nrm -rf /\n```\n")
    with pytest.raises(AssertionError, match="neither code"):
        read_blocks("<!-- readme-test: run -->\n```\nls\n```\n")
    with pytest.raises(AssertionError, match="unknown marker"):
        read_blocks("<!-- readme-test: maybe -->\n```sh\nls\n```\n")
    [block] = read_blocks('<!-- readme-test: start, ready "up" -->\n```sh\nserve\n```\n')
    assert (block.action, block.expect, block.text) == ("start", "up", "serve\n")


# The walkthrough ------------------------------------------------------------------------------


def substitute(text: str, ports: dict[int, int], where: str) -> str:
    """``text`` with every README port replaced by its stand-in."""
    for number in NUMBER.findall(text):
        assert int(number) in ports, (
            f"{where}: {number} looks like a port the test does not know; add it to PORTS")
    return NUMBER.sub(lambda m: str(ports[int(m.group())]), text)


@dataclass
class Session:
    """The scratch clone the blocks run in, and the processes they left running."""

    clone: Path
    logs: Path
    env: dict[str, str]
    state: Path
    running: list[subprocess.Popen[bytes]]

    def script(self, block: Block) -> Path:
        """A bash script running the block after the variables earlier blocks set, and recording
        the ones it sets (not those bash sets itself)."""
        path = self.logs / f"block-{block.line}.sh"
        path.write_text(
            "set -euo pipefail\n"
            f"source {self.state}\n"
            f"export -p > {self.logs}/before\n"
            "set -a\n"
            f"{block.text}"
            "set +a\n"
            "export -p | grep -vE '^declare -x (PWD|OLDPWD|SHLVL|_)='"
            f" > {self.logs}/after || true\n"
            f"comm -13 <(sort {self.logs}/before) <(sort {self.logs}/after) >> {self.state}\n")
        return path

    def spawn(self, block: Block) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"block-{block.line}.log"
        if block.language == "python":
            args = [sys.executable, "-c", block.text]
        else:
            args = ["bash", str(self.script(block))]
        with log.open("wb") as out:
            # A file, not a pipe, for output: jobs a block leaves in the background keep it open.
            # A session of its own: stopping it stops those jobs too.
            proc = subprocess.Popen(args, cwd=self.clone, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append(proc)
        return proc, log


def shown(block: Block, log: Path) -> str:
    output = log.read_text(errors="replace")
    return f"README.md:{block.line}:\n{block.text}--- its output:\n{output}"


def run_block(session: Session, block: Block) -> None:
    proc, log = session.spawn(block)
    try:
        status = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {RUN_TIMEOUT} s: {shown(block, log)}")
    assert status == 0, f"exit status {status}: {shown(block, log)}"
    assert block.expect in log.read_text(errors="replace"), (
        f"did not print {block.expect!r}: {shown(block, log)}")


def start_block(session: Session, block: Block) -> None:
    proc, log = session.spawn(block)
    deadline = time.monotonic() + START_TIMEOUT
    while block.expect not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"exited with status {proc.returncode} before {block.expect!r}: "
                        f"{shown(block, log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {block.expect!r} within {START_TIMEOUT} s: {shown(block, log)}")
        time.sleep(0.05)


def stop_all(running: list[subprocess.Popen[bytes]]) -> None:
    """Stop every process group the blocks started (SIGTERM, then SIGKILL)."""
    for proc in reversed(running):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # the group has no member left
            continue
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in reversed(running):
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)


def make_clone(root: Path) -> Path:
    """A folder laid out like a fresh clone, under git, with the repository's .venv."""
    clone = root / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "serve", clone / "scripts" / "serve")
    # The .venv the suite runs in is set up already; never let setup-venv reinstall it (into
    # the repository's own .venv, from this folder).
    stub = clone / "scripts" / "setup-venv"
    stub.write_text("#!/bin/sh\n# the test's .venv is set up already\n")
    stub.chmod(0o755)
    shutil.copy2(REPO / ".gitignore", clone / ".gitignore")
    (clone / ".venv").symlink_to(sys.prefix)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(clone)]
    subprocess.run([*git, "init", "-q"], check=True)
    # A symlink is not the folder .gitignore's ".venv/" names.
    with (clone / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("/.venv\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], check=True)
    return clone


def flush(url: str) -> None:
    for database in REDIS_DATABASES:
        client = redis.Redis.from_url(url, db=database)
        try:
            client.flushdb()
        finally:
            client.close()


@pytest.fixture
def session(tmp_path: Path, redis_url: str) -> Iterator[Session]:
    clone = make_clone(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "tmp").mkdir()
    state = logs / "state.sh"
    state.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
    env.update(PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               VIRTUAL_ENV=sys.prefix, TMPDIR=str(tmp_path / "tmp"))
    flush(redis_url)
    running: list[subprocess.Popen[bytes]] = []
    try:
        yield Session(clone, logs, env, state, running)
    finally:
        stop_all(running)
        flush(redis_url)


def test_the_walkthrough_and_every_snippet_run_as_written(
        session: Session, redis_url: str) -> None:
    ports = {port: free_port() for port in PORTS}
    ports[REDIS_PORT] = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    for block in read_blocks(README.read_text()):
        if block.action not in ("run", "start"):
            continue
        where = f"README.md:{block.line}"
        block = replace(block, text=substitute(block.text, ports, where),
                        expect=substitute(block.expect, ports, where))
        if block.action == "start":
            start_block(session, block)
        else:
            run_block(session, block)

    git = ["git", "-C", str(session.clone), "status", "--porcelain", "--untracked-files=all"]
    left = subprocess.run(git, capture_output=True, text=True, check=True).stdout
    assert left == "", f"the walkthrough left files git does not ignore:\n{left}"
