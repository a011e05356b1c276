"""The NOSPACE alarm is listed from the moment the write path reports a full database."""

from __future__ import annotations

import asyncio

from k8s_sql.store.space import ALARM_ROW, NOSPACE, Space


class SlowMeta:
    """A backend whose meta writes wait until released (a database under load)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.release = asyncio.Event()

    async def meta_get(self, name: str) -> int | None:
        return self.rows.get(name)

    async def meta_set(self, name: str, value: int) -> None:
        await self.release.wait()
        self.rows[name] = value


async def test_an_alarm_raised_by_the_write_path_is_listed_before_it_is_recorded() -> None:
    backend = SlowMeta()
    space = Space(backend, member_id=7)  # type: ignore[arg-type]
    space.database_full()  # what the group commit calls before answering NOSPACE
    assert space.nospace
    listing = asyncio.create_task(space.alarms())
    await asyncio.sleep(0)  # the listing runs while the recording waits on the database
    backend.release.set()
    assert await listing == [(7, NOSPACE)]
    assert backend.rows[ALARM_ROW] == 7
    assert await space.alarms() == [(7, NOSPACE)]
