"""The metanode's lock table on its own: POSIX range algebra, conflicts,
waiting and waking, interrupts, lapsed sessions and the grace after a start."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from shoalfs.client.locks import HeldLocks
from shoalfs.metanode import locks as locks_module
from shoalfs.metanode.locks import Lock, LockTable, apply
from shoalfs.proto.errors import Code, ShoalError
from shoalfs.proto.locks import EOF, FLOCK, POSIX, READ, UNLOCK, WRITE

A, B = ("sa", 1), ("sb", 7)
F = (2, POSIX)


def table(lease: float = 30.0) -> LockTable:
    t = LockTable(lease)
    t.born()
    return t


def hold(t: LockTable, owner: tuple[str, int], type: int, start: int, end: int, pid: int) -> None:
    t.touch(owner[0])  # a live session, as every request makes it
    t.set(F, owner, type, start, end, pid)


async def waiting(t: LockTable) -> None:
    """Until a request waits in the table (it has run up to its first wait)."""
    while not t._waiting:
        await asyncio.sleep(0)


def test_apply_splits_replaces_and_merges_ranges() -> None:
    mine = apply([], A, WRITE, 0, 100, 1)
    mine = apply(mine, A, UNLOCK, 40, 60, 1)  # a hole in the middle: two ranges
    assert [(lk.type, lk.start, lk.end) for lk in mine] == [(WRITE, 0, 40), (WRITE, 60, 100)]
    mine = apply(mine, A, READ, 30, 70, 1)  # a downgrade across the hole
    assert [(lk.type, lk.start, lk.end) for lk in mine] == [(WRITE, 0, 30), (READ, 30, 70), (WRITE, 70, 100)]
    mine = apply(mine, A, WRITE, 30, 70, 1)  # back up: one range again
    assert [(lk.type, lk.start, lk.end) for lk in mine] == [(WRITE, 0, 100)]
    assert apply(mine, A, UNLOCK, 0, EOF, 1) == []


def test_apply_matches_a_byte_model() -> None:
    """Random sequences of sets against a per-byte model of what the owner holds."""
    rng = random.Random(5)
    for _ in range(300):
        mine: list[Lock] = []
        model = [UNLOCK] * 64
        for _ in range(12):
            start = rng.randrange(64)
            end = rng.randrange(start + 1, 65)
            type = rng.choice((READ, WRITE, UNLOCK))
            mine = apply(mine, A, type, start, end, 1)
            model[start:end] = [type] * (end - start)
            got = [UNLOCK] * 64
            for lk in mine:
                got[lk.start:lk.end] = [lk.type] * (lk.end - lk.start)
            assert got == model
            # ranges are sorted, disjoint, and two of one type never touch
            for a, b in zip(mine, mine[1:], strict=False):
                assert a.end <= b.start and not (a.end == b.start and a.type == b.type)


def test_conflicts_are_per_kind_range_and_type() -> None:
    t = table()
    hold(t, A, READ, 0, 10, 1)
    assert t.conflict(F, B, READ, 0, 10) is None  # shared locks coexist
    assert t.conflict(F, B, WRITE, 10, 20) is None  # ranges that do not overlap
    blocking = t.conflict(F, B, WRITE, 5, 6)
    assert blocking is not None and blocking.public() == [READ, 0, 10, 1]
    assert t.conflict(F, A, WRITE, 0, 10) is None  # an owner never conflicts with itself (upgrade)
    assert t.conflict((2, FLOCK), B, WRITE, 0, EOF) is None  # flock and POSIX locks are apart
    t.release("sa", 2, POSIX, 1)
    assert t.conflict(F, B, WRITE, 0, EOF) is None


def test_a_waiter_is_woken_by_the_release() -> None:
    async def main() -> None:
        t = table()
        hold(t, A, WRITE, 0, EOF, 1)
        started = time.monotonic()
        waiter = asyncio.create_task(t.acquire(F, B, WRITE, 0, 1, 2, wait=10))
        await waiting(t)
        assert not waiter.done()
        t.release("sa", None, None, None)
        assert await waiter is None
        assert time.monotonic() - started < 1
        assert t.held(F, B) == [[WRITE, 0, 1, 2]]
    asyncio.run(main())


def test_a_waiter_gives_up_when_its_wait_runs_out_or_is_cancelled() -> None:
    async def main() -> None:
        t = table()
        hold(t, A, READ, 0, EOF, 1)
        blocking = await t.acquire(F, B, WRITE, 0, 1, 2, wait=0.1)
        assert blocking is not None and blocking.owner == A
        waiter = asyncio.create_task(t.acquire(F, B, WRITE, 0, 1, 2, wait=10))
        await waiting(t)
        t.cancel("sb", 7, 2)
        assert (await asyncio.wait_for(waiter, 1)) is not None
        t.cancel("sb", 7, 2)  # nobody waits: nothing is remembered for the next request
        blocking = await t.acquire(F, B, WRITE, 0, 1, 2, wait=0.2)
        assert blocking is not None
    asyncio.run(main())


def test_a_session_that_stops_renewing_loses_its_locks_and_wakes_waiters() -> None:
    async def main() -> None:
        t = table(lease=0.3)
        assert await t.acquire(F, A, WRITE, 0, EOF, 1, wait=0) is None
        started = time.monotonic()
        # B keeps its own session alive while it waits; A's lapses
        assert await t.acquire(F, B, WRITE, 0, EOF, 2, wait=5) is None
        assert 0.2 < time.monotonic() - started < 1.5
        assert t.held(F, A) == []
    asyncio.run(main())


def test_the_grace_grants_only_reclaims() -> None:
    async def main() -> None:
        t = LockTable(0.5)  # a leader that just started: not born empty
        with pytest.raises(ShoalError) as err:
            await t.acquire(F, B, WRITE, 0, EOF, 2, wait=0)
        assert err.value.code == Code.TRY_AGAIN
        with pytest.raises(ShoalError):
            t.test(F, B, WRITE, 0, EOF)
        answer = t.renew("sa", [[2, POSIX, 1, [[WRITE, 0, 100, 1]]]])
        assert answer == [[2, POSIX, 1, [[WRITE, 0, 100, 1]]]]
        async def renewing() -> None:  # A renews every third of a lease, as its client does
            while True:
                await asyncio.sleep(0.15)
                t.renew("sa", [[2, POSIX, 1, [[WRITE, 0, 100, 1]]]])
        renewer = asyncio.create_task(renewing())
        # B waits out the grace, then still finds A's reclaimed lock in the way
        started = time.monotonic()
        blocking = await t.acquire(F, B, WRITE, 0, 10, 2, wait=1.0)
        assert blocking is not None and blocking.owner == A
        assert t.settled and time.monotonic() - started >= 0.9
        renewer.cancel()
        # after the grace a claim of a lock the table does not have is not granted: lost
        assert t.renew("sc", [[2, POSIX, 3, [[WRITE, 200, 300, 9]]]]) == [[2, POSIX, 3, []]]
    asyncio.run(main())


def test_a_closed_table_grants_nothing() -> None:
    async def main() -> None:
        t = table()
        hold(t, A, WRITE, 0, EOF, 1)
        waiter = asyncio.create_task(t.acquire(F, B, WRITE, 0, EOF, 2, wait=10))
        await waiting(t)
        t.close()  # another term as leader, or the partition deleted
        with pytest.raises(ShoalError) as err:
            await asyncio.wait_for(waiter, 1)
        assert err.value.code == Code.TRY_AGAIN
    asyncio.run(main())


def test_held_locks_keep_the_newest_answer_and_what_a_failed_request_may_hold() -> None:
    held = HeldLocks()
    key = (2, POSIX, 1)
    held.learn(key, [[WRITE, 0, 10, 5]], ["t1", 7])
    held.learn(key, [], ["t1", 6])  # an older answer arriving late changes nothing
    assert held.holds(*key) and held.claims({2})[0] == [[2, POSIX, 1, [[WRITE, 0, 10, 5]]]]
    held.learn(key, [], ["t1", 8])
    assert not held.holds(*key) and not held
    held.learn(key, [[WRITE, 0, 10, 5]], ["t1", 7])  # nor after the locks were let go
    assert not held.holds(*key)
    held.learn(key, [[READ, 0, 1, 5]], ["t2", 0])  # another table (a new leader): its count starts over
    assert held.claims({2})[0] == [[2, POSIX, 1, [[READ, 0, 1, 5]]]]
    # a request whose answer never came may have been granted: a close must let go,
    # whatever answers came for the owner before or after
    other = (3, FLOCK, 9)
    held.asking(other)
    held.learn(other, [], ["t2", 3])
    assert held.holds(*other) and 3 in held.inos()
    held.sure(other)  # an unlock answered: nothing held
    assert not held.holds(*other)
    held.asking(other)
    held.forget(3, version=["t2", 4])
    assert not held.holds(*other)
    held.learn(other, [[WRITE, 0, EOF, 0]], ["t2", 5])  # a release answer older than a lock answer
    held.forget(3, version=["t2", 4])
    assert held.holds(*other)
    # a renewal that finds less than it claimed counts a loss
    claims, seen = held.claims({2})
    assert held.renewed(seen, [[2, POSIX, 1, []]], ["t2", 5]) == []
    assert held.lost == 1 and not held.holds(*key)


def test_a_renewal_answer_never_brings_back_locks_let_go_meanwhile() -> None:
    held = HeldLocks()
    key = (2, POSIX, 1)
    held.learn(key, [[WRITE, 0, 10, 5]], ["t1", 1])
    claims, seen = held.claims({2})
    held.forget(2, POSIX, 1, ["t1", 2])  # a close while the renewal was out
    # the renewal reached a new leader in its grace, which took the claim as a reclaim
    stale = held.renewed(seen, [[2, POSIX, 1, [[WRITE, 0, 10, 5]]]], ["t2", 1])
    assert not held.holds(*key)  # not ours again
    assert stale == [(key, [[WRITE, 0, 10, 5]])]  # and let go of again at the metanode
    assert held.lost == 0


def test_a_release_withdraws_the_owners_waiting_requests() -> None:
    """A client that gave up a request (EIO) and closed the file: the request
    still waiting at the metanode must not be granted afterwards."""
    async def main() -> None:
        t = table()
        hold(t, A, WRITE, 0, EOF, 1)
        waiter = asyncio.create_task(t.acquire(F, B, WRITE, 0, EOF, 2, wait=10))
        await waiting(t)
        t.release("sb", 2, POSIX, 7)  # B closes
        assert (await asyncio.wait_for(waiter, 1)) is not None
        t.release("sa", None, None, None)
        assert t.held(F, B) == []
    asyncio.run(main())


def test_two_shared_flocks_that_both_want_it_exclusive_do_not_wait_for_each_other() -> None:
    async def main() -> None:
        t = table()
        key = (2, FLOCK)
        for owner in (A, B):
            assert await t.acquire(key, owner, READ, 0, EOF, 1, wait=0) is None
        # as Linux: a conversion first lets go of the old lock, so one of them gets it
        first = asyncio.create_task(t.acquire(key, A, WRITE, 0, EOF, 1, wait=2))
        second = asyncio.create_task(t.acquire(key, B, WRITE, 0, EOF, 2, wait=2))
        results = await asyncio.wait_for(asyncio.gather(first, second), 3)
        assert None in results
    asyncio.run(main())


def test_the_grace_refuses_every_change_but_reclaims() -> None:
    """So no claim can be older than a change made at this table."""
    async def main() -> None:
        t = LockTable(30.0)  # a new leader, in its grace
        t.renew("sa", [[2, POSIX, 1, [[WRITE, 0, 10, 1], [READ, 20, 30, 1]]]])
        for change in (lambda: t.release("sa", 2, POSIX, 1),
                       lambda: t.acquire(F, A, UNLOCK, 20, 30, 1, wait=5),
                       lambda: t.acquire(F, A, WRITE, 40, 50, 1, wait=0)):
            with pytest.raises(ShoalError) as err:
                result = change()
                if asyncio.iscoroutine(result):
                    await result
            assert err.value.code == Code.TRY_AGAIN
        assert t.held(F, A) == [[WRITE, 0, 10, 1], [READ, 20, 30, 1]]
        # a read-only session reclaims no POSIX write lock
        assert t.renew("sr", [[2, POSIX, 4, [[WRITE, 100, 110, 1], [READ, 200, 210, 1]]]], may_write=False) == \
            [[2, POSIX, 4, [[READ, 200, 210, 1]]]]
    asyncio.run(main())


def test_a_lapsed_session_is_reaped_by_the_tick_and_an_unlock_is_never_withdrawn() -> None:
    async def main() -> None:
        t = table(lease=0.2)
        hold(t, A, WRITE, 0, EOF, 1)
        await asyncio.sleep(0.3)
        t.tick(serving=True)
        assert t._locks == {} and t._count == 0  # nobody asked about the file again
        hold(t, B, READ, 0, 10, 2)
        waiter = asyncio.create_task(t.acquire(F, A, WRITE, 0, 10, 1, wait=10))
        await waiting(t)
        t.cancel("sa", 1, 2)  # A's waiting request is withdrawn: its unlock still goes through
        assert await t.acquire(F, A, UNLOCK, 0, EOF, 1, wait=0) is None
        assert (await asyncio.wait_for(waiter, 1)) is not None
    asyncio.run(main())


def test_unlocks_that_split_ranges_count_against_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks_module, "MAX_SESSION_LOCKS", 3)
    t = table()
    hold(t, A, WRITE, 0, 100, 1)
    hold(t, A, UNLOCK, 10, 20, 1)
    hold(t, A, UNLOCK, 30, 40, 1)
    with pytest.raises(ShoalError) as err:
        hold(t, A, UNLOCK, 50, 60, 1)  # a fourth range
    assert err.value.code == Code.NO_SPACE
    assert len(t.held(F, A)) == 3


def test_time_the_partition_cannot_be_served_does_not_count_against_leases() -> None:
    async def main() -> None:
        t = table(lease=0.4)
        hold(t, A, WRITE, 0, EOF, 1)
        for _ in range(8):  # 0.8 s without serving: nobody could renew
            await asyncio.sleep(0.1)
            t.tick(serving=False)
        t.tick(serving=True)
        assert t.conflict(F, B, WRITE, 0, EOF) is not None  # A's lock did not lapse meanwhile
        await asyncio.sleep(0.5)
        t.tick(serving=True)
        assert t.conflict(F, B, WRITE, 0, EOF) is None  # served time counts
    asyncio.run(main())


def test_no_grant_from_a_node_that_may_not_serve() -> None:
    async def main() -> None:
        def refuse() -> None:
            raise ShoalError(Code.NOT_PARTITION_LEADER, "deposed")
        t = LockTable(30.0, refuse)
        t.born()
        with pytest.raises(ShoalError):
            await t.acquire(F, A, WRITE, 0, EOF, 1, wait=0)
        assert t.held(F, A) == []
    asyncio.run(main())
