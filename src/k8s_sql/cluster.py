"""Frontends sharing one database: who is alive, and who leads.

Every frontend refreshes its ``member`` row each second; MemberList shows the rows
refreshed recently, so clients discover every live frontend. One frontend at a
time is leader -- it holds ``meta.leader`` until ``meta.leader_until`` and renews it
each second -- and only the leader revokes expired leases. When the leader stops
renewing (killed, partitioned), another frontend takes over once the term lapses.
A leader that cannot renew stops acting as one when its own term ends, so two
frontends never both believe they lead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from k8s_sql.backend.base import Backend, MemberRow
from k8s_sql.background import BackgroundLoop

log = logging.getLogger(__name__)


class Membership(BackgroundLoop):
    task_name = "membership"

    def __init__(
        self,
        backend: Backend,
        member_id: int,
        name: str,
        client_urls: list[str],
        *,
        interval: float = 1.0,
        term: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.member_id = member_id
        self.name = name
        self.client_urls = client_urls
        self.interval = interval
        self.term = term
        self.clock = clock
        self.leader_id = 0
        self._lead_until = 0.0

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.member_id and self.clock() < self._lead_until

    async def tick(self) -> None:
        now = self.clock()
        await self.backend.heartbeat(MemberRow(self.member_id, self.name, ",".join(self.client_urls), now))
        until = now + self.term
        leader = await self.backend.try_lead(self.member_id, now, until)
        if leader == self.member_id:
            if self.leader_id != self.member_id:
                log.info("this frontend (%x) is now the leader", self.member_id)
            self._lead_until = until
        elif self.leader_id == self.member_id:
            log.info("leadership moved to %x", leader)
        self.leader_id = leader

    async def join(self) -> None:
        """Announce this frontend and contend for leadership once, then keep doing so."""
        await self.tick()
        self.start()

    async def leave(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.backend.remove_member(self.member_id)
            if self.is_leader:  # hand over at once instead of after the term lapses
                await self.backend.try_lead(self.member_id, self.clock(), 0.0)

    async def live_members(self) -> list[MemberRow]:
        return await self.backend.members(self.clock() - self.term)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("membership heartbeat failed: %s", e)
