"""Coalescing writes: what many callers ask for at once is written in one transaction.

SQLite has one write lock; a thousand fires due in the same second, each in its own
transaction, spend their time waiting for it. A :class:`Coalescer` lets each caller await its
own result while the writes made meanwhile go together: the first caller's batch is written at
once, and whatever arrives during that write forms the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def always(_: Exception) -> bool:
    return True


def never(_: Exception) -> bool:
    return False


class Coalescer(Generic[T, R]):
    """``await submit(item)`` -> the result ``flush`` gave for that item.

    ``flush`` receives a batch and returns one result per item, in order. If it raises for a
    batch of several items and ``split(exc)`` says the fault may be one item's, each item is
    flushed again alone, so each caller gets its own result or its own exception: one bad
    item cannot fail the callers that happened to arrive with it. A fault that is nobody's in
    particular (the database is unreachable: ``split`` says False) goes to every caller at
    once, rather than being met again once per item.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        split: Callable[[Exception], bool] = always,
    ) -> None:
        self._flush = flush
        self._split = split
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # callers woken in the same turn of the loop join in
            batch, self._pending = self._pending, []
            try:
                results = await self._flush([item for item, _ in batch])
            except Exception as exc:
                if len(batch) > 1 and self._split(exc):
                    for one in batch:
                        await self._flush_alone(*one)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # its caller may have been cancelled meanwhile
                    future.set_result(result)

    async def _flush_alone(self, item: T, future: asyncio.Future[R]) -> None:
        try:
            (result,) = await self._flush([item])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)
