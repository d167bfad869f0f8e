"""Background tasks are held until they end, and their failures are logged and counted."""

from __future__ import annotations

import asyncio
import gc
import logging

from prometheus_client import REGISTRY

from innova_server.background import BackgroundTasks


def failures(task: str) -> float:
    return REGISTRY.get_sample_value("innova_background_failures_total", {"task": task}) or 0.0


async def test_a_failing_task_is_logged_by_type_only_and_counted(caplog):
    caplog.set_level(logging.DEBUG, logger="innova")
    tasks = BackgroundTasks()
    before = failures("unit_fail")

    async def boom() -> None:
        raise RuntimeError("https://innovaplus.africa/reset?token=SECRET-TOKEN")

    task = tasks.spawn("unit_fail", boom())
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert failures("unit_fail") == before + 1
    assert len(tasks) == 0
    records = [r for r in caplog.records if r.name == "innova.background"]
    assert [r.levelno for r in records] == [logging.ERROR]
    assert "RuntimeError" in records[0].getMessage()
    assert "SECRET-TOKEN" not in caplog.text


async def test_tasks_are_held_until_they_end():
    tasks = BackgroundTasks()
    finished = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    tasks.spawn("unit_hold", work())
    gc.collect()  # a task referenced only by the loop could be collected here
    assert len(tasks) == 1
    await asyncio.wait_for(finished.wait(), 5)
    await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_drain_waits_then_cancels_what_is_left(caplog):
    tasks = BackgroundTasks()
    done: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        done.append("quick")

    async def stuck() -> None:
        await asyncio.sleep(60)
        done.append("stuck")

    tasks.spawn("unit_quick", quick())
    stuck_task = tasks.spawn("unit_stuck", stuck())
    before = failures("unit_stuck")
    await tasks.drain(grace_seconds=0.3)
    assert done == ["quick"]
    assert stuck_task.cancelled()
    assert len(tasks) == 0
    assert failures("unit_stuck") == before  # a cancellation at shutdown is not a failure
    assert "cancelled 1 unfinished" in caplog.text
