"""``serve --log-file``: lines go to the file, SIGHUP reopens it (logrotate), a bad path is a
clear error; on the journal (``$JOURNAL_STREAM``), text lines carry no time stamp of their own.

Each test runs ``python -m rendezvous serve`` as a subprocess on a free loopback port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, stop_process, wait_for_port

START_TIMEOUT = 20.0
LINE_TIMEOUT = 10.0
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def serve(tmp_path: Path, *extra: str, stderr: object = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        env=env or dict(os.environ))
    wait_for_port("127.0.0.1", port, START_TIMEOUT, proc)
    return proc


def wait_for_line(path: Path, needle: str) -> str:
    deadline = time.monotonic() + LINE_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if needle in text:
                return text
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in {path}: "
                         f"{path.read_text() if path.exists() else '(missing)'}")


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_process(proc)


def test_log_file_is_reopened_on_sighup(tmp_path: Path,
                                        stopped: list[subprocess.Popen[bytes]]) -> None:
    log = tmp_path / "relay.log"
    err = tmp_path / "stderr"
    with err.open("wb") as stream:
        proc = serve(tmp_path, "--log-file", str(log), stderr=stream)
    stopped.append(proc)
    first = wait_for_line(log, "listening")
    assert STAMP.match(first), first  # a file keeps its time stamps

    rotated = tmp_path / "relay.log.1"
    log.rename(rotated)  # what logrotate does, then its postrotate sends SIGHUP
    proc.send_signal(signal.SIGHUP)
    second = wait_for_line(log, "certificate=reloaded")
    assert "reopened log file" in second
    assert "listening" not in second
    assert "reopened log file" not in rotated.read_text()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "stopped" in log.read_text()
    assert "listening" not in err.read_text()  # nothing of the log went to stderr


def test_unwritable_log_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rendezvous", "serve", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--log-file", str(tmp_path / "no" / "x.log")],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "cannot open the log file" in proc.stderr and "x.log" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("journal", [False, True])
def test_journal_lines_have_no_stamp(tmp_path: Path, journal: bool,
                                     stopped: list[subprocess.Popen[bytes]]) -> None:
    """systemd sets $JOURNAL_STREAM to the device:inode of the stream it gave as stderr."""
    err = tmp_path / "stderr"
    env = dict(os.environ)
    with err.open("wb") as stream:
        info = os.fstat(stream.fileno())
        if journal:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        else:  # a JOURNAL_STREAM that names another file: not the journal
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino + 1}"
        stopped.append(serve(tmp_path, stderr=stream, env=env))
    line = next(line for line in wait_for_line(err, "listening").splitlines()
                if "listening" in line)
    if journal:
        assert line.startswith("listening "), line
    else:
        assert STAMP.match(line), line
