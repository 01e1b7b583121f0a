"""Server-sent events plumbing: the SSE response, merging per-choice streams, and watching for a gone client.

The SSE response closes its body generator as soon as the stream ends for any reason (client gone, error), so the
generator's `finally` — which aborts the engine request and frees its cache — runs right away instead of whenever
the garbage collector gets to it. Non-streaming requests watch the connection too: a client that hangs up while
its completion is being generated gets the request aborted (vLLM does the same).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

T = TypeVar("T")


class SSEResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            try:
                if closer is not None:
                    with anyio.CancelScope(shield=True):
                        await closer()
            finally:
                if self.on_close is not None:
                    self.on_close()


class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streaming) response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async generators as they come, tagged with the generator's index; errors propagate.

    Use it under `contextlib.aclosing`: closing the merge closes every source, so each engine request it feeds
    from is aborted right away when the consumer stops early.
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((index, item, False))
        except Exception as exc:
            await queue.put((index, exc, True))
        finally:
            await queue.put((index, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item, is_end = await queue.get()
            if is_end:
                if isinstance(item, Exception):
                    raise item
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
