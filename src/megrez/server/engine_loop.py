"""Drives one :class:`~megrez.engine.Engine` from a background thread for an asyncio server.

``Engine.step()`` must be called from a single thread and blocks for the length of a
forward pass, so it runs here, never on the event loop. The thread sleeps while the engine
has no work and wakes when a request arrives. Each step's outputs are handed to the event
loop in one ``call_soon_threadsafe`` call and delivered to the asyncio queue ("sink") of
the HTTP request that owns them, tagged with the caller's choice index.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from ..engine import Engine, RequestOutput, SamplingParams
from .metrics import Histogram

log = logging.getLogger("megrez.server")
FAILURES_UNHEALTHY = 3  # consecutive failed steps after which /health reports 503


class EngineFailed(RuntimeError):
    """The engine raised while stepping (the requests in that step were cancelled), or the
    server is shutting down; ``status`` and ``code`` are what the client is told."""

    def __init__(self, message: str, status: int = 500, code: str = "engine_error"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class _Entry:
    sink: asyncio.Queue
    tag: object
    submitted: float
    first_token: float | None = None


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._entries: dict[str, _Entry] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failures = 0  # consecutive failed steps
        self.finished = Counter()  # finish_reason -> requests
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram((0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    # ------------------------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="megrez-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail(list(self._entries), EngineFailed("the server is shutting down", 503, "server_shutting_down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def healthy(self) -> bool:
        """Running, and not failing step after step (which cancelling requests did not cure)."""
        return self.alive and self.failures < FAILURES_UNHEALTHY

    # ------------------------------------------------------------------------- requests (event loop thread)
    def add(self, prompt_ids: list[int], params: SamplingParams, sink: asyncio.Queue, tag=None,
            embeddings: list | None = None, logits_processors: list | None = None) -> str:
        """Queue one generation; its outputs arrive in ``sink`` as ``(tag, RequestOutput)``,
        or ``(tag, EngineFailed)``. Raises what ``Engine.add_request`` raises."""
        rid = uuid.uuid4().hex
        # Register first: the engine thread may produce this request's first output before
        # add_request even returns.
        self._entries[rid] = _Entry(sink, tag, time.monotonic())
        try:
            self.engine.add_request(prompt_ids, params, request_id=rid, embeddings=embeddings,
                                    logits_processors=logits_processors)
        except BaseException:
            del self._entries[rid]
            raise
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request and free its cache slot at the next step; no more outputs arrive."""
        if self._entries.pop(request_id, None) is not None:
            self.finished["abort"] += 1
            self.engine.abort(request_id)
            self._wake.set()

    @property
    def active(self) -> int:
        return len(self._entries)

    def fail_all(self, error: EngineFailed) -> None:
        """End every request in flight with ``error`` (event loop thread; used at shutdown)."""
        rids = list(self._entries)
        self._fail(rids, error)
        for rid in rids:
            self.engine.abort(rid)
        self._wake.set()

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            entry = self._entries.get(out.request_id)
            if entry is None:  # aborted by its caller: nobody is listening
                continue
            if entry.first_token is None and out.completion_tokens:
                entry.first_token = now
                self.ttft.observe(now - entry.submitted)
            if out.finished:
                del self._entries[out.request_id]
                self.finished[out.finish_reason] += 1
                self.latency.observe(now - entry.submitted)
            entry.sink.put_nowait((entry.tag, out))

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for rid in request_ids:
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self.finished["error"] += 1
                entry.sink.put_nowait((entry.tag, error))

    # ------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            # Clear before looking: a request added after the check sets the event again,
            # so the wait below cannot miss it.
            self._wake.clear()
            if not engine.has_work():
                self._wake.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # keep serving: cancel what was in flight, report it to its callers
                self.failures += 1
                log.exception("engine step failed; cancelling the requests in flight")
                in_flight = list(engine.requests)
                for rid in in_flight:
                    engine.abort(rid)
                self._post(self._fail, in_flight, EngineFailed(f"generation failed: {type(e).__name__}: {e}"))
                # A failure that outlives the cancellations must not spin the CPU or flood the log.
                time.sleep(min(1.0, 0.01 * 2 ** self.failures))
                continue
            self.failures = 0
            if outputs:
                self._post(self._dispatch, outputs, time.monotonic())

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is going away
            self._stopping = True
