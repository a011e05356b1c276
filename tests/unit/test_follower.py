"""The follower wakes for other frontends' commits, not for this frontend's own."""

from __future__ import annotations

from types import SimpleNamespace

from k8s_sql.watch.follower import Follower


def test_announcements_of_own_commits_do_not_wake_the_follower() -> None:
    hub = SimpleNamespace(revision=4)  # published up to 4
    store = SimpleNamespace(revisions=SimpleNamespace(committing=5))  # this frontend is committing 5
    follower = Follower(hub, store)  # type: ignore[arg-type]
    follower._heard(5)  # announced before the store published it: its own
    assert not follower._news.is_set()
    follower._heard(4)  # already published
    assert not follower._news.is_set()
    follower._heard(6)  # another frontend's
    assert follower._news.is_set()
