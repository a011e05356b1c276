"""A coroutine that runs as a task from ``start()`` until ``stop()``."""

from __future__ import annotations

import abc
import asyncio
import contextlib


class BackgroundLoop(abc.ABC):
    """Base for the frontend's long-running loops (lease expiry, log following,
    membership, progress ticks): one task each, cancelled cleanly on stop."""

    task_name = "background"
    _task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def run(self) -> None:
        """The loop itself; runs until cancelled."""

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
