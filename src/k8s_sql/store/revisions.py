"""The revisions one frontend knows, owned by one object.

Several parts learn of revisions -- this frontend's commits, reads, the follower
reading other frontends' commits, compactions -- and several read them (response
headers, the watch hub's compaction check, the follower's "is this mine?"). They
all go through :class:`Revisions`, so each number has one owner and only grows.
"""

from __future__ import annotations


class Revisions:
    """Invariants: ``current`` and ``compacted`` never decrease; ``committing`` is the
    revision of this frontend's latest commit, set as that commit is sent (a
    database that announces commits -- PostgreSQL -- may announce it before the
    commit's own publication, and the follower need not read it back)."""

    __slots__ = ("committing", "compacted", "current")

    def __init__(self) -> None:
        self.current = 0  # the newest committed revision this frontend has seen
        self.compacted = 0  # the newest compaction point it has seen
        self.committing = 0

    def observe(self, current: int, compacted: int = 0) -> None:
        """A read, a commit or the follower saw these revisions."""
        if current > self.current:
            self.current = current
        if compacted > self.compacted:
            self.compacted = compacted

    def reset(self, current: int, compacted: int) -> None:
        """The database's own numbers, read at start."""
        self.current, self.compacted = current, compacted
