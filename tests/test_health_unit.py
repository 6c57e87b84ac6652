"""Readiness: the probe loop ends on stop, whatever the dependency check does
with the cancellation."""

from __future__ import annotations

import asyncio

from shared_runtime.health import Readiness


async def test_stop_ends_the_probe_loop_when_stop_races_a_completing_check() -> None:
    # The check finishes in the same loop step in which stop() cancels the
    # probe loop: Python 3.11's wait_for returned the check's result there and
    # dropped the cancellation, so the loop probed forever and stop() (a test
    # teardown in CI) never returned.
    stoppers: list[asyncio.Task[None]] = []
    stop_started = asyncio.Event()
    checks = 0

    async def check() -> None:
        nonlocal checks
        checks += 1
        if checks == 2:  # the first probe runs in start()
            stoppers.append(asyncio.create_task(readiness.stop()))
            stop_started.set()
            await asyncio.sleep(0)

    readiness = Readiness(["svc"], check, interval=0.01)
    await readiness.start()
    await stop_started.wait()
    # asyncio.wait, not wait_for: cancelling a hung stop() at the timeout
    # would cancel the probe loop too and hide the hang.
    done, _ = await asyncio.wait(stoppers, timeout=5)
    assert readiness._task is not None
    try:
        assert done and readiness._task.done()
    finally:
        readiness._task.cancel()


async def test_stop_is_bounded_when_the_check_swallows_cancellation() -> None:
    entered = asyncio.Event()

    async def stubborn_check() -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # what some client libraries do: turn it into something else

    readiness = Readiness(["svc"], stubborn_check, interval=0.2)
    await readiness.start()  # the first probe times out after 0.5 s
    await entered.wait()
    done, _ = await asyncio.wait({asyncio.create_task(readiness.stop())}, timeout=5)
    assert done
    assert readiness._task is not None and readiness._task.done()


async def test_one_failed_check_is_not_an_outage_but_several_in_a_row_are() -> None:
    # A probe that times out once because the machine is busy must not turn a
    # replica NOT_SERVING (the state service empties its caches then).
    outcomes = iter([True, False, True, False, False, False, True])
    changes: list[bool] = []

    async def check() -> None:
        if not next(outcomes):
            raise ConnectionError("unreachable")

    readiness = Readiness(["svc"], check, interval=60, on_change=changes.append)
    await readiness.start()  # first probe: ready
    try:
        assert await readiness.probe_once() is False
        assert readiness.ready and changes == [True]
        assert await readiness.probe_once() is True
        for _ in range(2):
            await readiness.probe_once()
        assert readiness.ready and changes == [True]
        await readiness.probe_once()  # the third failure in a row
        assert not readiness.ready and changes == [True, False]
        await readiness.probe_once()
        assert readiness.ready and changes == [True, False, True]
    finally:
        await readiness.stop()


async def test_a_replica_never_ready_reports_its_first_failure_at_once() -> None:
    async def check() -> None:
        raise ConnectionError("unreachable")

    changes: list[bool] = []
    readiness = Readiness(["svc"], check, interval=60, on_change=changes.append)
    await readiness.start()
    try:
        assert changes == [False] and not readiness.ready
    finally:
        await readiness.stop()
