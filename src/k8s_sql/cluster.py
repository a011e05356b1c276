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

from k8s_sql import metrics
from k8s_sql.backend.base import ClusterTable, MemberRow
from k8s_sql.background import BackgroundLoop

log = logging.getLogger(__name__)
LEADER_ROWS = ("leader", "leader_until")  # the leader's member id; its term's end, in ms


class Membership(BackgroundLoop):
    task_name = "membership"

    def __init__(
        self,
        backend: ClusterTable,
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
        self.last_tick = 0.0  # when a heartbeat (a write) and the leader's read last succeeded

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.member_id and self.clock() < self._lead_until

    @property
    def leader_known(self) -> bool:
        """Whether this frontend knows a leader whose term it read within a term:
        etcd_server_has_leader (after a term without a successful tick, the leader it
        knew may be gone and another not yet known)."""
        return self.leader_id != 0 and self.clock() - self.last_tick < self.term

    @property
    def writable(self) -> bool:
        """Whether the database took this frontend's heartbeat (a write) within a term."""
        return self.clock() - self.last_tick < self.term

    async def tick(self) -> None:
        now = self.clock()
        await self.backend.heartbeat(MemberRow(self.member_id, self.name, ",".join(self.client_urls), now))
        until = now + self.term
        leader = await self.try_lead(now, until)
        if leader == self.member_id:
            if self.leader_id != self.member_id:
                log.info("this frontend (%x) is now the leader", self.member_id)
            self._lead_until = until
        elif self.leader_id == self.member_id:
            log.info("leadership moved to %x", leader)
        if leader and leader != self.leader_id:
            metrics.LEADER_CHANGES.inc()  # etcd counts the first leader it sees too
        self.leader_id = leader
        self.last_tick = self.clock()

    async def join(self) -> None:
        """Announce this frontend and contend for leadership once, then keep doing so."""
        await self.tick()
        self.start()

    async def leave(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.backend.remove_member(self.member_id)
            if self.is_leader:  # hand over at once instead of after the term lapses
                await self.try_lead(self.clock(), 0.0)

    async def try_lead(self, now: float, until: float) -> int:
        """Become (or stay) leader until ``until`` unless another frontend holds an
        unexpired term; the leader's member id either way. The term is two ``meta``
        rows, taken with a compare-and-set on what was read, so of frontends trying at
        once exactly one wins (the others see the winner on their next read)."""
        for _ in range(3):
            held = await self.backend.meta(LEADER_ROWS)
            leader, leader_until_ms = held.get("leader", 0), held.get("leader_until", 0)
            if leader not in (0, self.member_id) and leader_until_ms / 1000 > now:
                return leader
            taken = {"leader": self.member_id, "leader_until": int(until * 1000)}
            if await self.backend.meta_compare_and_set({"leader": leader, "leader_until": leader_until_ms}, taken):
                return self.member_id
        # Lost three races in a row: claim nothing this tick (the winner shows next tick).
        return leader if leader != self.member_id else 0

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
