"""Micro-batching: checks from concurrent callers share backend batches.

Every check a :class:`~visguard.engine.guard.Guard` runs goes through one :class:`MicroBatcher`: a worker
thread takes the first waiting request and runs it, with whatever else is queued behind it (up to
``max_batch``), as one backend batch. It waits up to ``max_wait_s`` for more only while callers
come together: when the previous batch had several items.
Under concurrency this turns N serialized forward passes into a few batched ones (requests that
arrive while a batch runs form the next one); a lone caller pays one thread hand-off (tens of µs)
and no window (``tests/test_batching.py::test_a_lone_caller_does_not_wait_out_the_window``).

Liveness: a batch that never returns must not stop every later check. A caller that gives up on a
running batch (its time limit passed) calls :meth:`MicroBatcher.abandon`: the worker stuck in that
batch is retired (it exits when the batch returns, its results dropped) and a fresh worker serves
the queue. At most ``max_stalled`` retired workers may be stuck at once; beyond that, new checks
fail at once with :class:`~visguard.core.errors.BackendStalledError` (the guard reports them
``unavailable`` with that reason) until a stuck batch returns.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from visguard.core.errors import BackendStalledError

_STOP = object()


class MicroBatcher:
    """Collect submitted items into batches and run them on one worker thread.

    Args:
        run: ``run(items, key) -> results`` for a batch of items sharing ``key`` (e.g. the mode); a
            result that is an exception instance is raised to that item's caller alone, and an
            exception ``run`` raises to every caller of the batch.
        max_batch: most items in one batch.
        max_wait_s: how long the first item of a batch waits for company after a batch that had some
            (several items); otherwise it runs at once with whatever is already queued.
        idle_s: the worker thread exits after this long without work (a new one starts on demand).
        name: worker thread name.
        max_stalled: most abandoned workers still stuck in a batch before new items fail fast.
    """

    def __init__(self, run: Callable[[list[Any], Any], list[Any]], *, max_batch: int = 16, max_wait_s: float = 0.002,
                 idle_s: float = 30.0, name: str = "visguard-batcher", max_stalled: int = 2) -> None:
        if max_stalled < 1:
            raise ValueError("max_stalled must be >= 1")
        self._run = run
        self.configure(max_batch=max_batch, max_wait_s=max_wait_s)
        self.idle_s = idle_s
        self.max_stalled = max_stalled
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        self._closed = False
        #: worker -> (futures of the batch it is running, when that batch started)
        self._running: dict[threading.Thread, tuple[frozenset[Future[Any]], float]] = {}
        #: worker -> groups of its current batch not started yet
        self._pending: dict[threading.Thread, list[list[tuple[Any, Any, Future[Any], float]]]] = {}
        #: retired workers still inside a batch -> when that batch started
        self._stalled: dict[threading.Thread, float] = {}
        #: workers retired because their batch outlived its callers
        self.abandoned = 0
        #: batches run and items checked so far
        self.batches = 0
        self.items = 0
        #: callbacks ``observer(key, results, waited_s)`` after each successful batch (metrics)
        self.observers: list[Callable[[Any, list[Any], list[float]], None]] = []

    def configure(self, *, max_batch: int | None = None, max_wait_s: float | None = None) -> None:
        """Change the batch size or wait (applies from the next batch)."""
        if max_batch is not None:
            if max_batch < 1:
                raise ValueError("max_batch must be >= 1")
            self.max_batch = max_batch
        if max_wait_s is not None:
            if max_wait_s < 0:
                raise ValueError("max_wait_s must be >= 0")
            self.max_wait_s = max_wait_s

    def submit(self, items: list[Any], key: Any) -> list[Future[Any]]:
        """Queue items; each returned future resolves to that item's result."""
        futures: list[Future[Any]] = [Future() for _ in items]
        now = time.perf_counter()
        with self._lock:  # queue under the lock: an idle worker decides to exit under it too
            if self._closed:
                raise RuntimeError("batcher is closed")
            if len(self._stalled) >= self.max_stalled:
                oldest = time.monotonic() - min(self._stalled.values())
                error = BackendStalledError(
                    f"guard backend stalled: {len(self._stalled)} batches still running after their callers "
                    f"gave up (the oldest for {oldest:.0f} s); checks fail fast until one returns"
                )
                for fut in futures:
                    fut.set_exception(error)
                return futures
            for item, fut in zip(items, futures, strict=True):
                self._queue.put((item, key, fut, now))
            self._ensure_worker()
        return futures

    @property
    def stalled(self) -> int:
        """Abandoned workers still stuck in a batch."""
        with self._lock:
            return len(self._stalled)

    def abandon(self, futures: list[Future[Any]]) -> None:
        """The caller gives up on ``futures`` (its time limit passed).

        Queued ones are cancelled (they will not run). If a worker is running a batch that holds
        one of them, that worker is retired: it exits when the batch returns (its results are
        dropped) and a fresh worker serves the rest of the queue, so one stuck batch never blocks
        later checks.
        """
        running = {f for f in futures if not f.cancel() and not f.done()}
        if not running:
            return
        with self._lock:
            for worker, (batch, since) in list(self._running.items()):
                if worker in self._stalled or not running & batch:
                    continue
                self._stalled[worker] = since
                self.abandoned += 1
                for group in self._pending.pop(worker, []):  # its groups not started yet go back in line
                    for entry in group:
                        self._queue.put(entry)
                if self._thread is worker:
                    self._thread = None
                    if not self._closed and not self._queue.empty():
                        self._ensure_worker()

    def _ensure_worker(self) -> None:  # under self._lock
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker after the batches already queued, and wait (at most ``timeout`` s) for it to end.

        Once ``close`` returns, the worker holds nothing: what it referenced is not released later on
        a daemon thread, possibly while the interpreter shuts down (a torch tensor freed there takes
        the GIL back during finalization and the process aborts with "terminate called without an
        active exception"). A retired worker still stuck in a batch (:meth:`abandon`) is not waited for.
        """
        with self._lock:
            self._closed = True
            worker = self._thread
            if worker is not None:
                self._queue.put(_STOP)
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)


    def _loop(self) -> None:
        me = threading.current_thread()
        busy = False  # the previous batch had company: wait for it again
        while True:
            try:
                first = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        if self._thread is me:
                            self._thread = None
                        return
                continue
            if first is _STOP:
                return
            batch = [first]
            # Items already queued join at once; wait the window for more only after a batch that had
            # company (callers arriving together): a lone caller's check runs at once.
            with self._lock:  # a submit still queueing its items holds it: after this they are all queued
                pass
            deadline = time.monotonic() + (self.max_wait_s if busy else 0.0)
            stop = False
            while len(batch) < self.max_batch:
                try:
                    wait = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            busy = len(batch) > 1
            if not self._execute(batch) or stop:
                return
            # Let go of the batch before waiting for the next one: an idle worker must not keep its
            # requests, their futures and (through the runner in each key) the guard and its model alive.
            batch.clear()
            first = nxt = None

    def _execute(self, batch: list[tuple[Any, Any, Future[Any], float]]) -> bool:
        """Run ``batch`` key by key; ``False`` when this worker was retired meanwhile (it must exit)."""
        me = threading.current_thread()
        by_key: dict[Any, list[tuple[Any, Any, Future[Any], float]]] = defaultdict(list)
        for entry in batch:
            by_key[entry[1]].append(entry)
        with self._lock:
            self._pending[me] = list(by_key.values())  # groups not started yet: abandon() may hand them on
        while True:
            with self._lock:
                groups = self._pending.get(me)
                if not groups:
                    self._pending.pop(me, None)
                    return True
                group = groups.pop(0)
                # skip items whose caller gave up (timed out) while they were queued
                entries = [(item, fut, queued) for item, _, fut, queued in group if fut.set_running_or_notify_cancel()]
                if not entries:
                    continue
                self._running[me] = (frozenset(fut for _, fut, _ in entries), time.monotonic())
            key = group[0][1]
            self.batches += 1
            self.items += len(entries)
            try:
                results = self._run([item for item, _, _ in entries], key)
                if len(results) != len(entries):
                    raise RuntimeError(f"batch runner returned {len(results)} results for {len(entries)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, fut, _ in entries:
                    fut.set_exception(exc)
            else:
                done = time.perf_counter()
                # A result that is an exception fails that item alone (e.g. a request too long for the
                # model); the items batched with it, other callers' too, get their results.
                ok = [(result, done - queued) for (_, _, queued), result in zip(entries, results, strict=True)
                      if not isinstance(result, BaseException)]
                if ok:
                    for observer in list(self.observers):
                        try:
                            observer(key, [r for r, _ in ok], [w for _, w in ok])
                        except Exception:  # noqa: BLE001 - metrics must never break a check
                            pass
                for (_, fut, _), result in zip(entries, results, strict=True):
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
            with self._lock:
                self._running.pop(me, None)
                if self._stalled.pop(me, None) is not None:  # retired while this group ran
                    self._pending.pop(me, None)
                    return False


_shared: weakref.WeakKeyDictionary[Any, MicroBatcher] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def shared_batcher(owner: Any, *, max_batch: int, max_wait_s: float) -> MicroBatcher:
    """The one batcher of ``owner`` (a backend): every guard on a backend shares its batches.

    The key passed to :meth:`MicroBatcher.submit` must be ``(runner, key)``, where
    ``runner(items, key)`` runs a batch (a guard passes its own run method and the mode).
    """
    with _shared_lock:
        try:
            batcher = _shared.get(owner)
        except TypeError:  # an unhashable or non-weak-referenceable owner gets a batcher of its own
            return MicroBatcher(_dispatch, max_batch=max_batch, max_wait_s=max_wait_s)
        if batcher is None or batcher._closed:
            batcher = MicroBatcher(_dispatch, max_batch=max_batch, max_wait_s=max_wait_s)
            _shared[owner] = batcher
        return batcher


def _dispatch(items: list[Any], key: tuple[Callable[[list[Any], Any], list[Any]], Any]) -> list[Any]:
    runner, inner = key
    return runner(items, inner)
