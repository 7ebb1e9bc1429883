"""An aiohttp application served on 127.0.0.1 from a thread of its own: how the test
doubles of remote services (the OpenAI-protocol server, the Hub) listen on a real socket."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from aiohttp import web


class ServedApp:
    """`make_app()` is called in the server's thread (its handlers then belong to that
    thread's event loop); `port` 0 takes a free one. `loop` is the server's event loop, for
    callers that schedule work on it."""

    def __init__(self, make_app: Callable[[], web.Application], name: str, port: int = 0, **runner_kw):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                runner = web.AppRunner(make_app(), access_log=None, **runner_kw)
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start())
                self.port = runner.addresses[0][1]
            except BaseException as e:  # pragma: no cover - reported to the starting thread
                err.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        ready.wait(10)
        if err:
            raise err[0]
        assert self.port is not None, f"{name} did not start"

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop = None
