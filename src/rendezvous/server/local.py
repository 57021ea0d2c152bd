"""What the relay tells commands on its own machine, through its data folder.

    DATA_DIR/relay.json         its public address (host, port, certificate), written at start
                                and kept after it stops: ``users add``/``rotate`` and the admin
                                page make files for that address (see ``registrar``)
    DATA_DIR/relay-PORT.sock    its live numbers, one JSON document to each connection, for
                                ``rendezvous status``; mode 0600, removed when the relay stops

The socket is local and guarded by the data folder's mode (0700), so it needs no password; it
reads nothing from its peer. Nothing runs unless a command asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rendezvous import logs, registrar
from rendezvous.config import RelayAddress, ServerConfig
from rendezvous.errors import ConfigError

if TYPE_CHECKING:
    from rendezvous.admin.status import StatusSampler
    from rendezvous.server.hub import Hub

STATUS_SOCKET = "relay-{port}.sock"  # one per listening port: cluster nodes may share a folder
# sun_path holds 108 bytes with its NUL; a deeper data folder gets no status socket.
MAX_SOCKET_PATH = 107
# A `rendezvous status` that stops reading does not hold the relay's socket for long.
STATUS_WRITE_TIMEOUT = 2.0
# The relay answers at once; one that does not within this long is stuck or not ours.
STATUS_TIMEOUT = 5.0
# A status document is a few hundred bytes per ID; anything past this is not one.
MAX_STATUS = 16 * 1024 * 1024


class LocalRecords:
    """DATA_DIR/relay.json and the status socket of a relay listening on ``port``."""

    def __init__(
        self, config: ServerConfig, hub: Hub[Any], port: int, listening: list[str]
    ) -> None:
        assert config.data_dir is not None
        self.data_dir: Path = config.data_dir
        self.config = config
        self.hub = hub
        self.port = port
        self.listening = listening
        self.socket_path: Path | None = (self.data_dir / STATUS_SOCKET.format(port=port)).resolve()
        self._server: asyncio.AbstractServer | None = None
        self._sampler: StatusSampler | None = None
        self._started = time.time()

    async def start(self) -> None:
        """Open the status socket and write relay.json (a failure is logged, not fatal: the
        relay serves either way)."""
        path = self.socket_path
        if path is not None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
            logs.event("no status socket: the data folder's path is too long",
                       level=logging.WARNING, path=str(path))
            self.socket_path = path = None
        if path is not None:
            try:
                self._server = await _unix_server(path, self._answer)
            except OSError as exc:
                logs.event("no status socket", level=logging.WARNING, path=str(path),
                           error=exc.strerror or str(exc))
                self.socket_path = None
        public = self.config.public or RelayAddress("localhost")
        tls = self.config.tls
        record = registrar.RelayRecord(
            host=public.host, port=public.port or self.port,
            cert_file=tls.cert_file if tls is not None else None,
            listening=tuple(self.listening), status_socket=self.socket_path,
            pid=os.getpid(), started=self._started, domain=self.config.domain,
            acme=self.config.acme is not None,
        )
        try:
            written = registrar.remember_relay(self.data_dir, record)
        except ConfigError as exc:
            logs.event("cannot record the relay's address", level=logging.WARNING,
                       error=str(exc))
        else:
            logs.event("recorded public address", file=str(written),
                       server=f"{record.host}:{record.port}")

    async def close(self) -> None:
        """Close the status socket and remove its file (relay.json stays: it is remembered)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
            if self.socket_path is not None:
                self.socket_path.unlink(missing_ok=True)

    def snapshot(self) -> dict[str, Any]:
        """What ``rendezvous status`` shows: the admin page's numbers and who answers."""
        if self._sampler is None:
            # Imported on the first question only: the admin package loads aiohttp.
            from rendezvous.admin.status import StatusSampler

            self._sampler = StatusSampler(self.hub)
        found = self._sampler.snapshot()
        found["listening"] = self.listening
        if self.hub.cluster is not None:
            found["cluster"] = self.hub.cluster.status()
        found["pid"] = os.getpid()
        found["started"] = self._started
        return found

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self.snapshot()).encode("utf-8") + b"\n")
            async with asyncio.timeout(STATUS_WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the asker left; nothing to report
        finally:
            writer.close()


async def _unix_server(path: Path, handler: Any) -> asyncio.AbstractServer:
    """Listen on the Unix socket ``path`` (mode 0600), replacing a stale one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # left by a relay that did not stop cleanly
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return await asyncio.start_unix_server(handler, sock=sock)


def ask_relay(path: Path) -> dict[str, Any]:
    """The status document of the relay listening on the Unix socket ``path``."""
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(STATUS_TIMEOUT)
            sock.connect(str(path))
            size = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_STATUS:
                    raise ConfigError(f"{path} sent more than {MAX_STATUS} bytes: not a relay")
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(f"no relay answers on {path}: is it running?") from None
    except TimeoutError:
        raise ConfigError(f"the relay on {path} did not answer within {STATUS_TIMEOUT:g} s") \
            from None
    except OSError as exc:
        raise ConfigError(f"cannot ask the relay on {path}: {exc.strerror or exc}") from None
    try:
        found = json.loads(b"".join(chunks))
        if not isinstance(found, dict) or not isinstance(found.get("ids"), dict):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{path} did not answer with a relay's status") from None
    return found
