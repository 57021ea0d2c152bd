"""The event loop and the signals of every long-running command (serve, admin, hidden, open).

    runtime.run(main(), use_uvloop=True)        # on uvloop when it is wanted and installed

    async def main() -> None:
        stop = asyncio.Event()
        with runtime.signals(stop.set, on_reload=reload):  # SIGINT/SIGTERM; SIGHUP
            await stop.wait()
            ...                                  # shut down: the handlers are still there

Imports nothing of the relay, so an agent started from the CLI pulls in no server code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rendezvous import logs

T = TypeVar("T")

# The signals that ask a process to stop gracefully.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when available and wanted (its TLS costs a tenth of asyncio's per connection)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            logs.event("uvloop unavailable, using asyncio's loop", level=logging.WARNING)
        else:
            return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a new loop (see :func:`loop_factory`); its result."""
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(main)


@contextmanager
def signals(
    on_stop: Callable[[], None], on_reload: Callable[[], None] | None = None
) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call ``on_stop`` (every time: a second one may
    mean "hurry"), and SIGHUP calls ``on_reload`` when given (else SIGHUP keeps its default,
    which ends the process). Must be entered on the running loop's thread."""
    loop = asyncio.get_running_loop()
    handled = [*STOP_SIGNALS, signal.SIGHUP] if on_reload is not None else [*STOP_SIGNALS]
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_stop)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        yield
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
