"""Coalesced writes: concurrent callers share one flush, each gets its own result."""

from __future__ import annotations

import asyncio

import pytest

from engine.outbox.batching import Coalescer


def test_callers_arriving_together_share_one_flush() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    async def scenario() -> list[int]:
        coalescer = Coalescer(flush)
        first = asyncio.gather(*(coalescer.submit(i) for i in range(5)))
        await asyncio.sleep(0.001)  # these arrive while the first flush runs
        second = asyncio.gather(*(coalescer.submit(i) for i in range(5, 8)))
        return [*await first, *await second]

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7]]


def test_a_failed_flush_fails_its_callers_only() -> None:
    async def flush(items: list[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("disk full")
        return items

    async def scenario() -> None:
        coalescer = Coalescer(flush)
        with pytest.raises(RuntimeError, match="disk full"):
            await coalescer.submit(0)
        assert await coalescer.submit(1) == 1

    asyncio.run(scenario())
