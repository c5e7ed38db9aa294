"""A bound on the heavy CPU work one ingress replica runs at once: reading bodies, preparing records, plotting.

Why a bound of its own: Serve's ``max_ongoing_requests`` counts requests, not what they cost, and a request can cost
much (a 32 MiB body decoded, a record resampled and filtered, a plot rendered). Without a bound, a burst of such
requests runs all at once and the replica's memory grows with the burst. With one, at most ``slots`` of them run;
the next waits up to ``wait_s`` for a slot and then gets a fast 503 with ``Retry-After`` (`Busy`).

Why a slot is released by the work, not by the request: the proxy's timeout (and a client that hangs up) cancels the
request's coroutine, but a thread started with ``asyncio.to_thread`` cannot be stopped and runs on. A slot held by
such work stays taken until the thread ends, so the bound counts what really runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")


class Busy(Exception):
    """Every work slot stayed taken for ``wait_s``: the replica is overloaded, the client should retry."""


class Slot:
    """One taken slot; `offload` runs the work in a thread and hands the slot over to it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self.handed_over = False

    async def offload(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread; the slot is released when it returns, even if this coroutine is cancelled
        first. One call per slot."""
        if self.handed_over:
            raise RuntimeError("a slot runs one piece of work")
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        self.handed_over = True
        future.add_done_callback(self._finished)
        return await asyncio.shield(future)

    def _finished(self, future: asyncio.Future) -> None:
        self._release()
        if not future.cancelled():
            future.exception()   # retrieved: a cancelled request's failure is not logged as "never retrieved"


class WorkSlots:
    """At most ``slots`` pieces of heavy work at once in this process; waiting longer than ``wait_s`` -> `Busy`."""

    def __init__(self, slots: int, wait_s: float) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._semaphore = asyncio.Semaphore(slots)

    @asynccontextmanager
    async def taken(self) -> AsyncIterator[Slot]:
        """A slot for the block (released at its end unless work was handed to a thread with `Slot.offload`)."""
        if not self._semaphore.locked():
            await self._semaphore.acquire()   # free: taken at once (``wait_for`` with a zero timeout never is)
        else:
            try:
                await asyncio.wait_for(self._semaphore.acquire(), timeout=self.wait_s)
            except TimeoutError:
                raise Busy(f"all {self.slots} work slots of this replica are busy") from None
        slot = Slot(self._semaphore.release)
        try:
            yield slot
        finally:
            if not slot.handed_over:
                self._semaphore.release()

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread, in a slot of its own."""
        async with self.taken() as slot:
            return await slot.offload(fn)
