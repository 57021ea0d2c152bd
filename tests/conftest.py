"""Fixtures shared by the whole suite."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from support import free_port, stop_process, tail, wait_for_port

# redis-server starts in well under a second; this only bounds a broken start.
REDIS_START_TIMEOUT = 10.0


def _redis_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def flush_redis(url: str) -> None:
    """Empty the Redis database at ``url`` (FLUSHDB), so a test starts from nothing."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` for the whole session, on a free port: its ``redis://`` URL."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    port = free_port()
    # No persistence: the data lives only as long as the test session.
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(log)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        try:
            wait_for_port("127.0.0.1", port, REDIS_START_TIMEOUT, proc)
            # Listening is not yet serving (it may still be loading): wait for a PONG.
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while not _redis_ping(url):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {port} does not answer PING")
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"redis-server did not start: {exc}\n{tail(log)}")
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def redis_registry_url(redis_url: str) -> str:
    """The session's Redis URL, its database emptied for this test."""
    flush_redis(redis_url)
    return redis_url
