"""The engine behind an asyncio server: one background thread steps it, each request streams through a queue.

The `Engine` is single-threaded, so every call into it (add, abort, step) happens on one engine thread; asyncio
code only posts commands to a thread-safe list and wakes the thread. Each step's deltas are handed back to the
event loop that asked for the request (`call_soon_threadsafe` into that request's `asyncio.Queue`). Leaving the
`generate` iterator early (client disconnect, task cancellation) aborts the request, which frees its cache. One
process, one engine thread, no ZMQ: the model step dominates, and the GIL is released inside torch ops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fp4serve.engine.engine import Engine, EngineStats, RequestOutputDelta

if TYPE_CHECKING:
    from fp4serve.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a failed step); no further requests are served."""


@dataclass(frozen=True, slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutputDelta | BaseException]

    def put(self, item: RequestOutputDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # the caller's event loop is already closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine: Engine, *, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[tuple[str, tuple[Any, ...]]] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fp4serve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        mm_inputs: Any = None,
    ) -> AsyncIterator[RequestOutputDelta]:
        """Stream the request's deltas; bad input raises ValueError on the first iteration."""
        if self._dead is not None:
            raise EngineDeadError("the engine is not running") from self._dead
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._post("add", request_id, list(prompt_token_ids), params, mm_inputs)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._post("abort", request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its stream ends with a finish_reason "abort" delta."""
        self._post("abort", request_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread after the step in flight; open streams end with EngineDeadError."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _post(self, command: str, *args: Any) -> None:
        with self._lock:
            self._commands.append((command, args))
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                self._dispatch(self.engine.step())
            reason: BaseException = EngineDeadError("the engine was shut down")
        # every failure, whatever its type, must reach the requests waiting on it
        except BaseException as exc:
            logger.exception("engine step failed; the engine stops")
            reason = exc
        self._dead = reason
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(EngineDeadError(f"the engine stopped: {reason}"))

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command, args in commands:
            if command == "add":
                request_id, prompt, params, mm_inputs = args
                try:
                    self.engine.add_request(request_id, prompt, params, mm_inputs=mm_inputs)
                except ValueError as exc:
                    self._send(request_id, exc)
            elif command == "abort":
                self.engine.abort(args[0])

    def _dispatch(self, deltas: list[RequestOutputDelta]) -> None:
        for delta in deltas:
            self._send(delta.request_id, delta)

    def _send(self, request_id: str, item: RequestOutputDelta | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)
