"""Background coroutines with an explicit start and stop: one body, or a round every interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTask:
    def __init__(self, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.body = body
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.body())

    async def stop(self) -> None:
        """Cancel and wait, so nothing runs after stop() returns."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class Periodic:
    """A round every `interval` seconds in the background (0: never), with an
    explicit start and stop. Subclasses say what a round does."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._background = BackgroundTask(self._loop)

    def start(self) -> None:
        if self.interval > 0:
            self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round()
            except Exception:
                log.exception("%s: round failed; the next one runs in %gs", type(self).__name__, self.interval)

    async def round(self) -> None:
        raise NotImplementedError
