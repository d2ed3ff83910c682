"""Micro-batching of concurrent checks."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from visguard import Backend, Generation, Guard, Policy
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.batching import MicroBatcher, _dispatch


class CountingBackend(Backend):
    """Scores by text length; records every batch it is given and takes 50 ms per batch."""

    name = "counting"
    model_id = "counting"

    def __init__(self):
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def score(self, prompts):
        with self._lock:
            self.batches.append(len(prompts))
            time.sleep(0.05)
            return [min(1.0, len(p.messages[0]["content"][-1]["text"]) % 97 / 96) for p in prompts]

    def generate(self, prompts, *, max_new_tokens):
        return [Generation(text="Verdict: safe")] * len(prompts)


def test_concurrent_callers_share_batches_and_get_their_own_answers():
    backend = CountingBackend()
    guard = Guard(backend, VisguardFormat(), Policy(timeout_s=5), max_batch=16, max_wait_ms=20)
    texts = [f"request number {i} " + "x" * i for i in range(32)]
    expected = {t: guard.check_input(None, t).score for t in texts[:3]}
    backend.batches.clear()
    got: dict[str, float] = {}

    def worker(t: str) -> None:
        got[t] = guard.check_input(None, t).score

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 32 and all(0 <= s <= 1 for s in got.values())
    for t, s in expected.items():
        assert got[t] == pytest.approx(s)
    assert sum(backend.batches) == 32
    # 32 serial forward passes would take 1.6 s of model time; batching needs far fewer.
    assert len(backend.batches) <= 8 and max(backend.batches) > 1
    assert guard.batcher.items >= 32 and guard.batcher.batches >= len(backend.batches)


def test_batch_observer_sees_this_guards_batches_only():
    backend = CountingBackend()
    guard = Guard(backend, VisguardFormat())
    other = guard.with_policy(threshold=0.9)
    seen = []
    guard.add_batch_observer(lambda mode, verdicts, waited: seen.append((mode, [v.label for v in verdicts], waited)))
    guard.add_batch_observer(lambda mode, verdicts, waited: 1 / 0)  # a broken observer breaks nothing
    guard.check_batch([guard.request(None, "a"), guard.request(None, "bb")])
    other.check_input(None, "c")
    assert len(seen) == 1 and seen[0][0] == "fast" and len(seen[0][1]) == 2
    assert all(w >= 0 for w in seen[0][2])
    guard.configure_batching(max_batch=3, max_wait_ms=1)
    assert (other.batcher.max_batch, other.batcher.max_wait_s) == (3, 0.001)


def test_guards_on_one_backend_share_the_batcher_but_keep_their_policies():
    backend = CountingBackend()
    strict = Guard(backend, VisguardFormat(), Policy(threshold=0.0))
    lax = strict.with_policy(threshold=1.0)
    assert strict._batcher is lax._batcher
    assert strict.check_input(None, "x").label == "unsafe"
    assert lax.check_input(None, "x").label == "safe"


def test_timed_out_items_still_queued_are_not_run():
    release = threading.Event()
    seen: list[int] = []

    def run(items, key):
        seen.extend(items)
        release.wait(2)
        return items

    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0)
    first = batcher.submit([1], None)
    time.sleep(0.05)
    later = batcher.submit([2, 3], None)
    assert all(f.cancel() for f in later)  # the caller gave up while they were queued
    release.set()
    assert first[0].result(timeout=2) == 1
    batcher.close()
    time.sleep(0.05)
    assert seen == [1]


def test_errors_reach_every_caller_of_the_batch():
    def run(items, key):
        raise ValueError("boom")

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.01)
    futures = batcher.submit([1, 2], None)
    for f in futures:
        with pytest.raises(ValueError, match="boom"):
            f.result(timeout=2)
    with pytest.raises(ValueError):
        MicroBatcher(run, max_batch=0)


def test_an_exception_result_fails_that_item_alone():
    """A runner may fail one item by returning an exception for it (a request too long for the
    model): that caller gets the exception, the others batched with it their results, and
    observers see only the results."""
    seen = []

    def run(items, key):
        return [ValueError(f"item {i} refused") if i == 2 else i * 10 for i in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05)
    batcher.observers.append(lambda key, results, waited: seen.append((results, len(waited))))
    futures = batcher.submit([1, 2, 3], None)
    assert futures[0].result(timeout=2) == 10 and futures[2].result(timeout=2) == 30
    with pytest.raises(ValueError, match="item 2 refused"):
        futures[1].result(timeout=2)
    assert seen == [([10, 30], 2)]
    batcher.close()


def test_idle_worker_exits_and_restarts():
    batcher = MicroBatcher(lambda items, key: [i * 2 for i in items], idle_s=0.05)
    assert batcher.submit([3], None)[0].result(timeout=2) == 6
    time.sleep(0.3)
    assert batcher._thread is None
    assert batcher.submit([4], None)[0].result(timeout=2) == 8


class _Stuck:
    """A batch runner that hangs on the item ``"hang"`` until released (an Event: no sleeps order anything)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items, key):
        if "hang" in items:
            self.entered.set()
            self.release.wait(60)
        return [f"{key}:{i}" for i in items]


def _stuck_workers(batcher: MicroBatcher) -> list[threading.Thread]:
    with batcher._lock:
        return list(batcher._stalled)


def test_a_stuck_batch_does_not_block_the_checks_after_it():
    """Issue 10 #6: one hung batch kept the single worker thread, so every later item timed out too."""
    run = _Stuck()
    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0)
    hung = batcher.submit(["hang"], "a")
    assert run.entered.wait(10)
    batcher.abandon(hung)  # its caller's time limit passed
    assert batcher.abandoned == 1 and batcher.stalled == 1
    assert batcher.submit(["ok"], "a")[0].result(timeout=10) == "a:ok"  # a fresh worker serves it
    (stuck,) = _stuck_workers(batcher)
    run.release.set()
    stuck.join(10)
    assert not stuck.is_alive() and batcher.stalled == 0
    assert hung[0].result(timeout=1) == "a:hang"  # finished late; its caller had gone


def test_items_batched_with_a_stuck_one_move_to_the_fresh_worker():
    run = _Stuck()
    batcher = MicroBatcher(run, max_batch=2, max_wait_s=30)  # the worker waits until both are queued
    hung = batcher.submit(["hang"], "a")
    other = batcher.submit(["ok"], "b")  # same collected batch, another key: runs after "a"
    assert run.entered.wait(10)
    batcher.configure(max_wait_s=0)
    batcher.abandon(hung)
    assert other[0].result(timeout=10) == "b:ok"
    run.release.set()


def test_when_too_many_batches_are_stuck_new_items_fail_fast():
    from visguard.core.errors import BackendStalledError

    run = _Stuck()
    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0, max_stalled=2)
    for _ in range(2):
        run.entered.clear()
        hung = batcher.submit(["hang"], "a")
        assert run.entered.wait(10)
        batcher.abandon(hung)
    fast = batcher.submit(["ok"], "a")[0]
    assert fast.done()  # no waiting for a time limit
    with pytest.raises(BackendStalledError, match="2 batches still running"):
        fast.result()
    stuck = _stuck_workers(batcher)
    run.release.set()
    for t in stuck:
        t.join(10)
    assert batcher.stalled == 0
    assert batcher.submit(["ok"], "a")[0].result(timeout=10) == "a:ok"


def test_a_runner_returning_the_wrong_number_of_results_fails_its_callers():
    batcher = MicroBatcher(lambda items, key: items[:-1] if len(items) > 1 else items, max_batch=4, max_wait_s=0)
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        batcher.submit([1, 2], None)[0].result(timeout=10)
    assert batcher.submit([3], None)[0].result(timeout=10) == 3  # the worker survived


class _Runner:
    def run(self, items, key):
        return items


def test_close_joins_the_worker_and_an_idle_worker_holds_no_batch():
    """An idle worker holding its last batch (runner -> guard -> model) and a close() that did not wait
    for it let the worker free torch tensors during interpreter shutdown: `make demo` aborted with
    "terminate called without an active exception" (2 of 4 cached reruns). close() joins the worker."""
    batcher = MicroBatcher(_dispatch, idle_s=60.0)
    runner = _Runner()
    ref = weakref.ref(runner)
    assert [f.result(5) for f in batcher.submit(["a", "b"], (runner.run, "fast"))] == ["a", "b"]
    worker = batcher._thread
    del runner
    batcher.close()
    assert not worker.is_alive()  # close() returned: nothing of the worker runs later (e.g. at exit)
    gc.collect()
    assert ref() is None  # the worker let go of its last batch


def test_a_lone_caller_does_not_wait_out_the_window():
    """A lone item runs at once: with a 30 s window the old worker held it for the whole window
    (the check below would then time out); items submitted together, or arriving while a batch
    with company ran, still share batches."""
    batches = []
    batcher = MicroBatcher(lambda items, key: batches.append(list(items)) or items, max_batch=8, max_wait_s=30)
    try:
        assert batcher.submit([1], None)[0].result(timeout=10) == 1  # not held for the 30 s window
        futures = batcher.submit([2, 3, 4], None)  # one caller's batch: counted before any is queued
        assert [f.result(timeout=10) for f in futures] == [2, 3, 4]
        assert batches == [[1], [2, 3, 4]]
    finally:
        batcher.configure(max_wait_s=0)
        batcher.close()
