"""A background coroutine with an explicit start and stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


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
