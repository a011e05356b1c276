"""How the batcher gathers a batch (GroupCommit._gather): what is queued, and when
fewer are queued than the last batch held, as many as that after a bounded wait."""

from __future__ import annotations

import asyncio
from typing import Any

from k8s_sql.store import batch as batch_mod
from k8s_sql.store.batch import GroupCommit, _Queued
from k8s_sql.store.revisions import Revisions


def _queued(loop: asyncio.AbstractEventLoop) -> _Queued:
    async def apply(req: Any) -> None:
        return None

    return _Queued(apply, loop.create_future(), [], [], False)


async def test_a_lone_client_is_never_kept_waiting() -> None:
    gc = GroupCommit(backend=None, revisions=Revisions())  # type: ignore[arg-type]
    gc._last_size, gc._last_seconds = 1, 1.0  # a long last batch of one
    gc._queue.put_nowait(_queued(asyncio.get_running_loop()))
    got = await asyncio.wait_for(gc._gather(), 0.05)  # no wait at all
    assert len(got) == 1


async def test_a_batch_waits_for_as_many_as_the_last_one_held(monkeypatch) -> None:
    monkeypatch.setattr(batch_mod, "LINGER_MAX", 10.0)  # only a wake-up can end the wait in time
    loop = asyncio.get_running_loop()
    gc = GroupCommit(backend=None, revisions=Revisions())  # type: ignore[arg-type]
    gc._last_size, gc._last_seconds = 4, 1.0
    gc._queue.put_nowait(_queued(loop))
    gathering = asyncio.create_task(gc._gather())
    await asyncio.sleep(0)
    assert not gathering.done()  # one queued, four expected: it waits

    async def apply(req: Any) -> None:
        return None

    # three clients submit: the third wakes the batcher (the wait would be 1 s, the last batch's time)
    clients = [asyncio.create_task(gc.submit(apply)) for _ in range(3)]
    assert len(await asyncio.wait_for(gathering, 0.5)) == 4
    assert gc._want == 0
    for c in clients:
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)


async def test_the_wait_is_bounded(monkeypatch) -> None:
    """At most LINGER_MAX, and at most LINGER_SHARE of the last batch's time."""
    loop = asyncio.get_running_loop()
    gc = GroupCommit(backend=None, revisions=Revisions())  # type: ignore[arg-type]
    monkeypatch.setattr(batch_mod, "LINGER_MAX", 0.02)
    gc._last_size, gc._last_seconds = 50, 10.0
    gc._queue.put_nowait(_queued(loop))
    started = loop.time()
    assert len(await gc._gather()) == 1
    assert 0.015 <= loop.time() - started < 0.5
    gc._last_seconds = 0.001  # a fast last batch: a short wait
    gc._queue.put_nowait(_queued(loop))
    started = loop.time()
    assert len(await gc._gather()) == 1
    assert loop.time() - started < 0.015
