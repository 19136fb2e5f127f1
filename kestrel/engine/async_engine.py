"""The engine for the server: one thread steps the Engine, each request reads its own async stream.

The Engine is not thread-safe, so exactly one thread (the engine loop) ever calls it. The event
loop talks to that thread through a command queue (add, abort, call) and receives outputs through
``loop.call_soon_threadsafe``. A request whose reader goes away is aborted at once, which frees
its KV blocks in the next loop iteration. If ``step()`` raises, the engine is dead: every stream
fails with :class:`EngineDeadError` and every later request is refused at once, never hung.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from kestrel.outputs import RequestOutput, merge_delta
from kestrel.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the server answers 503 until it is restarted."""


class EngineStoppedError(RuntimeError):
    """The server is shutting down (or shut down) and takes no more work."""


class RequestAbortedError(RuntimeError):
    """The request was aborted from outside its reader (e.g. its client went away)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What /metrics reads: taken on the engine thread, so the reader never touches the Engine."""

    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    preemptions: int = 0
    steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    time: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class OutputListener(Protocol):
    """Told about token progress on the event loop thread (the server's metrics implement it)."""

    def on_tokens(self, num_prompt: int, num_new: int) -> None: ...

    def on_finished(self, out: RequestOutput) -> None: ...

    def on_aborted(self) -> None: ...


class RequestStream:
    """Outputs of one request. A reader that falls behind gets one output for all it missed:
    the newest when they are cumulative, the queued ones merged when they are deltas."""

    def __init__(self, request_id: str, delta: bool = False) -> None:
        self.request_id = request_id
        self.delta = delta  # the request's output_kind is "delta"
        self.closed = False  # nothing more will be put
        self.num_tokens = 0  # generated tokens seen so far, over all samples (for metrics)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        if self.closed:
            return
        self._queue.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            self.closed = True

    async def next(self) -> RequestOutput:
        """The next output, covering all that were queued (see the class); raises the error
        the request failed with."""
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            newer = self._queue.get_nowait()
            if self.delta and not isinstance(newer, BaseException):
                item = merge_delta(item, newer)
            else:  # cumulative: older outputs add nothing to the newest
                item = newer
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    """Async facade over an Engine, owning the single thread that may call it."""

    def __init__(self, engine: Any, listener: OutputListener | None = None) -> None:
        self.engine = engine
        self.listener = listener
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "is it dead?" against "it died"
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._stopped: str | None = None  # why new work is refused (draining / stopped)
        self.snapshot = EngineSnapshot()
        self.tokenizer = engine.tokenizer  # read-only use from the event loop is safe
        self.max_model_len: int = engine.cfg.scheduler.max_model_len
        self.vocab_size: int = engine.cfg.model_config.vocab_size

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._publish_snapshot()
        self._thread = threading.Thread(target=self._run, name="kestrel-engine", daemon=True)
        self._thread.start()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        # A parallel executor watches its worker ranks: a dead rank turns health red at once.
        workers_ok = getattr(self.engine.executor, "healthy", True)
        return self._dead is None and alive and self._stopped is None and workers_ok

    @property
    def status(self) -> str:
        if self._dead is not None:
            return f"engine loop died: {self._dead!r}"
        if self._stopped is not None:
            return self._stopped
        worker_error = getattr(self.engine.executor, "dead_error", None)
        if worker_error is not None:
            return f"parallel worker failed: {worker_error}"
        return "ok" if self.healthy else "engine loop not running"

    def stop_accepting(self, reason: str) -> None:
        """Refuse new requests (graceful shutdown); running ones go on."""
        self._stopped = self._stopped or reason

    def num_live_requests(self) -> int:
        return len(self._streams)

    def fail_all(self, error: BaseException) -> None:
        """Abort every live request, giving its reader ``error`` (end of a drain)."""
        for rid in list(self._streams):
            self.abort(rid, error)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: live requests fail with EngineStoppedError, the thread is joined."""
        self.stop_accepting("server is shutting down")
        self.fail_all(EngineStoppedError("server shut down before the request finished"))
        self._send(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    # ---- requests -----------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int],
                          params: SamplingParams) -> RequestStream:
        """Queue a request; raises ValueError (bad input), QueueFullError, or the two above."""
        self._check_accepting()
        stream = RequestStream(request_id, delta=params.output_kind == "delta")
        self._streams[request_id] = stream
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            self._send(("add", request_id, prompt, params, time.monotonic(), fut))
            await asyncio.wrap_future(fut)
        except BaseException:
            self._streams.pop(request_id, None)
            refused = fut.done() and not fut.cancelled() and fut.exception() is not None
            if not refused:  # cancelled: it may have been added all the same
                self._send(("abort", request_id))
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs until finished; leaving early (disconnect, cancel) aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        done = False
        try:
            while not done:
                out = await stream.next()
                done = out.finished
                yield out
        finally:
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Stop a request now (its KV blocks are freed before the engine's next step).

        Its reader, if still reading, gets ``error`` (RequestAbortedError by default).
        """
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.closed:
            stream.put(error or RequestAbortedError(f"request {request_id} was aborted"))
            self._send(("abort", request_id))

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` on the engine thread (tokenizer work that must not race the loop)."""
        self._check_accepting()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self.status)
        if self._stopped is not None:
            raise EngineStoppedError(self._stopped)
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def _send(self, cmd: tuple[Any, ...]) -> None:
        with self._lock:
            if self._dead is not None:
                _fail_command(cmd, EngineDeadError(self.status))
                return
            self._commands.put(cmd)

    # ---- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            # No autograd on the serving path (and the sampler edits logits in place).
            with torch.inference_mode():
                self._loop_until_stopped()
        except BaseException as e:
            log.exception("engine loop died")
            self._die(e)
        else:
            log.info("engine loop stopped")

    def _loop_until_stopped(self) -> None:
        wait: float | None = None
        while self._apply_commands(wait):
            steps = self.engine.stats.num_steps
            outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
            self._publish_snapshot()
            if outputs:
                self._to_loop(self._deliver, outputs)
            # Block while idle; nap briefly when requests exist but nothing could run.
            busy = self.engine.has_unfinished_requests()
            wait = None if not busy else (0.005 if self.engine.stats.num_steps == steps else 0.0)

    def _apply_commands(self, wait: float | None) -> bool:
        """Run queued commands, first waiting up to ``wait`` s (None: forever) for one.

        Returns False once told to stop.
        """
        cmds = []
        if wait is None or wait > 0:
            try:
                cmds.append(self._commands.get(timeout=wait))
            except queue.Empty:
                pass
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in cmds:
            if cmd[0] == "stop":
                for rid in list(self.engine.groups):
                    self.engine.abort_request(rid)
                self._publish_snapshot()
                return False
            self._apply(cmd)
        if cmds:
            self._publish_snapshot()
        return True

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "abort":
            live = cmd[1] in self.engine.groups
            self.engine.abort_request(cmd[1])
            if live and self.listener is not None:
                self._to_loop(self.listener.on_aborted)
            return
        fut: concurrent.futures.Future[Any] = cmd[-1]
        if not fut.set_running_or_notify_cancel():
            return  # the caller gave up before we got here
        try:
            if kind == "add":
                _, rid, prompt, params, arrival, _ = cmd
                self.engine.add_request(rid, prompt, params, arrival_time=arrival)
                fut.set_result(None)
            else:
                fut.set_result(cmd[1](self.engine))
        except Exception as e:  # noqa: BLE001 - handed to the caller, the engine goes on
            fut.set_exception(e)

    def _publish_snapshot(self) -> None:
        e = self.engine
        pool = e.pool
        self.snapshot = EngineSnapshot(
            waiting=len(e.scheduler.waiting), running=len(e.scheduler.running),
            kv_blocks_total=pool.num_blocks, kv_blocks_used=pool.num_blocks - pool.num_free,
            prefix_cache_hits=pool.hits, prefix_cache_queries=pool.queries,
            preemptions=e.stats.num_preemptions, steps=e.stats.num_steps,
            spec_draft_tokens=e.stats.num_draft_tokens,
            spec_accepted_tokens=e.stats.num_accepted_tokens, time=time.time())

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
            while True:
                try:
                    _fail_command(self._commands.get_nowait(), EngineDeadError(self.status))
                except queue.Empty:
                    break
        self._to_loop(self.fail_all_dead)

    def fail_all_dead(self) -> None:
        err = EngineDeadError(self.status)
        for stream in self._streams.values():
            stream.put(err)
        self._streams.clear()

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # ---- the event loop side of delivery ------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if self.listener is not None:
                self._count(stream, out)
            stream.put(out)
            if out.finished:
                self._streams.pop(out.request_id, None)

    def _count(self, stream: RequestStream, out: RequestOutput) -> None:
        total = sum(len(c.token_ids) for c in out.outputs)
        if stream.delta:
            total += stream.num_tokens
        first = stream.num_tokens == 0 and total > 0
        self.listener.on_tokens(len(out.prompt_token_ids) if first else 0,
                                total - stream.num_tokens)
        stream.num_tokens = total
        if out.finished:
            self.listener.on_finished(out)


def _fail_command(cmd: tuple[Any, ...], error: BaseException) -> None:
    fut = cmd[-1] if cmd and isinstance(cmd[-1], concurrent.futures.Future) else None
    if fut is not None and fut.set_running_or_notify_cancel():
        fut.set_exception(error)
