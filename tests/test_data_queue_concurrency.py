"""Concurrency and lifecycle of PinnedRingQueue and SessionBatcher.iter_queued: errors, early stops, close() from
anywhere, what a consumer may hold, order against the single-threaded path, and bad arguments.

Every risky part runs on a daemon thread (or a subprocess) joined with a timeout: a hang fails, it never blocks."""

import linecache
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from hiertcn_fast.data import PinnedRingQueue, SessionBatcher
from hiertcn_fast.data import ring_queue
from helpers import run_bounded

SPEC = {"value": ((3, 4), torch.int64), "weight": ((5,), torch.float32)}
HANG_SECONDS = 20  # only ever reached by something that hangs, which is the failure


def producer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("PinnedRingQueue-producer-") and t.is_alive()]


def assert_no_producers_left(seconds=3.0):
    deadline = time.monotonic() + seconds
    while producer_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert producer_threads() == [], f"producer threads left running: {producer_threads()}"


@pytest.fixture(autouse=True)
def _no_leftover_producers():
    assert_no_producers_left()  # earlier tests' threads would blur this test's checks
    yield


def delayed_producer(total, seed, max_delay=0.002):
    """Writes batch ``seq`` as a function of seq only, after a random pause (a random interleaving per seed)."""
    rng, lock = random.Random(seed), threading.Lock()

    def produce(seq, slot):
        if seq >= total:
            return False
        with lock:
            pause = rng.uniform(0, max_delay)
        time.sleep(pause)
        slot["value"].copy_(torch.arange(12).view(3, 4) + 100 * seq)
        slot["weight"].fill_(seq * 0.25)
        return True

    return produce


def expected_batch(seq):
    return {"value": torch.arange(12).view(3, 4) + 100 * seq, "weight": torch.full((5,), seq * 0.25)}


# ---- defects ---------------------------------------------------------------------------------------------------


def _interrupt_at_event(n, codes_of):
    """A tracer raising KeyboardInterrupt at the ``n``-th "call" or "line" event in a frame whose code ``codes_of``
    accepts, on the thread that installs it: where CPython runs a pending signal handler (a function's entry, a
    line's start), so where a real Ctrl-C can land. Returns (tracer, fired list)."""
    count, fired = [0], []

    def tracer(frame, event, arg):
        if fired or not codes_of(frame.f_code):
            return tracer if not fired else None
        # A with line's "line" event comes again as the block is left, before __exit__: a traced raise there skips
        # the release, which a real signal cannot do (it is taken after a call returns), so those are left out.
        if event == "call" or (event == "line" and not _a_with_line(frame)):
            count[0] += 1
            if count[0] == n:
                sys.settrace(None)
                fired.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}:{frame.f_lineno}")
                raise KeyboardInterrupt(f"simulated Ctrl-C at {fired[-1]}")
        return tracer

    return tracer, fired


def _a_with_line(frame):
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with ")


def _in_queue_or_threading(code):
    return code.co_filename in (ring_queue.__file__, threading.__file__)


def test_a_ctrl_c_anywhere_in_get_and_what_it_calls_is_a_keyboard_interrupt_and_loses_no_batch():
    """A Ctrl-C landing at any point of get(), the threading code it calls included (Condition.wait's), reaches the
    consumer as KeyboardInterrupt, leaves the ring's lock free, and a consumer that goes on gets every batch once,
    in order. get() waited in Condition.wait, which takes the lock back in Python code: a Ctrl-C there left the
    lock released, and get()'s ``with`` released it again (RuntimeError 'release unlocked lock' instead of the
    KeyboardInterrupt) or released a producer's hold (the producer then failed, and its published batch was
    lost)."""
    total, n, outcomes = 3, 1, set()

    def produce(seq, slot):  # batches come late: the consumer waits in get() for each
        time.sleep(0.03)
        slot["value"].fill_(seq)
        return seq < total

    while True:
        queue = PinnedRingQueue(SPEC, produce, num_producers=1, num_slots=2)
        tracer, fired = _interrupt_at_event(n, _in_queue_or_threading)

        def consume():
            got = []
            sys.settrace(tracer)
            try:
                item = queue.get()
                got.append(item[0])
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            owned = queue._ring.lock._is_owned()
            got += [seq for seq, tensors in iter(queue.get, None)
                    if torch.equal(tensors["value"], torch.full((3, 4), seq))]
            return got, owned

        try:
            result, error = run_bounded(consume, HANG_SECONDS)
        finally:
            queue.close()
        assert error is None, f"interrupted at {fired}: then {error!r} {getattr(error, '__notes__', '')}"
        got, owned = result
        assert not owned, f"interrupted at {fired}: the ring's lock stayed held"
        # Every batch once, in order; past get()'s commit of a batch (its last lines) the interrupt takes that batch
        # with it, as it would any function's return value.
        assert got in [list(range(total))] + [[s for s in range(total) if s != lost] for lost in range(total)], (
            f"interrupted at {fired}: got {got}")
        if not fired:
            break
        outcomes.add(fired[0].split(":")[0])
        n += 1
    assert n > 20 and outcomes == {"ring_queue.py", "threading.py"}, (n, outcomes)
    assert_no_producers_left()


SIGNAL_HANDLER_CLOSE = textwrap.dedent("""
    import os, signal, sys, threading, time
    import torch
    from hiertcn_fast.data import PinnedRingQueue
    from hiertcn_fast.data.ring_queue import QueueStats

    release, handled = threading.Event(), []

    def produce(seq, slot):  # batch 0 at once, then nothing until the end
        if seq > 0:
            release.wait()
        slot["x"].fill_(seq)
        return seq == 0

    class SignalledStats(QueueStats):
        # get() adds its wait to consumer_wait_seconds holding the ring's lock, as it takes a ready batch: the first
        # time, SIGTERM is sent and the setter waits until its handler ran (time.sleep runs a pending handler, as
        # the return of any call in get() would).
        sent = True  # (armed below, once constructed)

        @property
        def consumer_wait_seconds(self):
            return self.__dict__.get("_wait", 0.0)

        @consumer_wait_seconds.setter
        def consumer_wait_seconds(self, value):
            self.__dict__["_wait"] = value
            if not SignalledStats.sent:
                SignalledStats.sent = True
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
                deadline = time.monotonic() + 10
                while not handled and time.monotonic() < deadline:
                    time.sleep(0.01)

    queue = PinnedRingQueue({"x": ((2,), torch.int64)}, produce, num_producers=1, num_slots=2)
    while queue._ring.ready_seq[0] != 0:
        time.sleep(0.01)
    stats = SignalledStats(queue._ring.num_slots)
    SignalledStats.sent = False
    queue._ring.stats = stats

    def on_sigterm(signum, frame):  # a graceful-shutdown handler: stop the loader
        print("handler calls close()", flush=True)
        print("close ->", queue.close(), flush=True)
        handled.append(1)

    signal.signal(signal.SIGTERM, on_sigterm)
    seq, tensors = queue.get()
    print("got", seq, tensors["x"].tolist(), flush=True)
    try:
        queue.get()
    except RuntimeError as error:
        print("get raised:", error, flush=True)
    release.set()
    print("closed again ->", queue.close(), flush=True)
    print("done", flush=True)
""")



def test_close_from_a_signal_handler_landing_while_get_holds_the_lock_does_not_deadlock():
    """A signal handler that calls close() (a SIGTERM handler stopping the loader) landing while get() holds the
    ring's lock waited for that lock, held by its own thread, for ever. Forced interleaving: get()'s call of
    alive_producers, made under the lock, has SIGTERM sent and sleeps until its handler has run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-c", SIGNAL_HANDLER_CLOSE], env=env, capture_output=True, text=True,
                              timeout=15)
    except subprocess.TimeoutExpired as expired:  # subprocess.run killed it (SIGKILL)
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        pytest.fail(f"close() called from a signal handler while get() held the ring's lock hung (output: {out!r})")
    assert done.returncode == 0, done.stderr[-2000:]
    # The handler's close() sets the flag and returns False (this thread holds the lock the producers need); get()
    # hands over the batch it had taken, the next get() raises, and a later close() joins the producer.
    assert done.stdout.splitlines() == ["handler calls close()", "close -> False", "got 0 [0, 0]",
                                        "get raised: PinnedRingQueue.get() after close()", "closed again -> True",
                                        "done"], done.stdout


# ---- passing checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_producers,num_slots,seed", [(1, 1, 0), (2, 1, 1), (3, 2, 2), (5, 3, 3), (4, 7, 4)])
def test_every_batch_once_in_order_and_held_batches_are_never_overwritten(num_producers, num_slots, seed):
    total = 60

    def consume():
        rng = random.Random(seed + 100)
        held = []
        with PinnedRingQueue(SPEC, delayed_producer(total, seed), num_producers=num_producers,
                             num_slots=num_slots) as queue:
            for seq, tensors in queue:
                held.append((seq, tensors))  # held to the end: the docs say delivered tensors are the consumer's
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.003))
            assert queue.get() is None
            stats = queue.stats.as_dict()
        return held, stats

    (held, stats), error = run_bounded(consume, HANG_SECONDS)
    assert error is None, repr(error)
    assert [seq for seq, _ in held] == list(range(total))
    for seq, tensors in held:
        want = expected_batch(seq)
        assert all(torch.equal(tensors[name], want[name]) for name in want), f"batch {seq} overwritten"
    assert stats["delivered"] == total and 1 <= stats["max_occupancy"] <= num_slots
    assert_no_producers_left()


def test_slot_tensors_are_not_what_the_consumer_receives():
    seen_slots = []

    def produce(seq, slot):
        seen_slots.append({name: t.data_ptr() for name, t in slot.items()})
        slot["value"].fill_(seq)
        return seq < 4

    def consume():
        with PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=2) as queue:
            return [tensors for _, tensors in queue]

    got, error = run_bounded(consume, HANG_SECONDS)
    assert error is None, repr(error)
    slot_pointers = {p for slot in seen_slots for p in slot.values()}
    assert not any(t.data_ptr() in slot_pointers for batch in got for t in batch.values())
    assert [int(batch["value"][0, 0]) for batch in got] == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from model_helpers import synthetic_cache

    return synthetic_cache(tmp_path_factory.mktemp("fuzz_ring_queue"))


def batch_fields(batch):
    return {name: tensor.clone() for name, tensor in batch.tensors().items()}


def assert_same_batches(queued, direct):
    assert [b.index for b in queued] == [b.index for b in direct]
    for got, want in zip(queued, direct):
        width = want.items.shape[2]
        assert (got.items[..., width:] == 0).all() and torch.equal(got.items[..., :width], want.items)
        for name in ("lengths", "step_widths", "valid", "keep", "user", "session", "continues"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (got.index, name)


@pytest.mark.parametrize("num_producers,num_slots,resume_at,seed", [(1, 1, 0, 0), (3, 2, 0, 1), (4, 3, 5, 2),
                                                                     (2, 5, 1, 3)])
def test_iter_queued_equals_single_threaded_iteration_whatever_the_producers_timing(
        synthetic, num_producers, num_slots, resume_at, seed):
    def make():
        batcher = SessionBatcher(synthetic, "train", lanes=6, sessions_per_batch=3, shuffle=True, seed=7)
        batcher.load_state_dict({**batcher.state_dict(), "epoch": 1, "next_index": resume_at})
        return batcher

    direct_batcher = make()
    direct = list(direct_batcher)
    assert len(direct) > 4
    queued_batcher = make()
    real_fill, rng, lock = queued_batcher.fill, random.Random(seed), threading.Lock()

    def jittery_fill(index, out, epoch=None):  # a random interleaving of the producers
        with lock:
            pause = rng.uniform(0, 0.003)
        time.sleep(pause)
        return real_fill(index, out, epoch)

    queued_batcher.fill = jittery_fill
    queued, error = run_bounded(lambda: list(queued_batcher.iter_queued(num_producers, num_slots)))
    assert error is None, repr(error)
    assert_same_batches(queued, direct)
    assert (queued_batcher.epoch, queued_batcher.next_index) == (direct_batcher.epoch, direct_batcher.next_index)
    again, error = run_bounded(lambda: list(make().iter_queued(num_producers, num_slots)))  # deterministic
    assert error is None, repr(error)
    assert_same_batches(again, direct)
    assert_no_producers_left()


@pytest.mark.parametrize("raised", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("how", ["queue", "iter_queued"])
def test_an_exception_in_the_consumers_loop_body_stops_every_producer(synthetic, raised, how):
    def make():
        if how == "queue":
            return PinnedRingQueue(SPEC, delayed_producer(10**6, 0, 0.0), num_producers=3, num_slots=2)
        return SessionBatcher(synthetic, "train", lanes=6, sessions_per_batch=3).iter_queued(3, 2)

    def consume():
        # The iterator is the loop's own (not bound to a name that the error's traceback would keep alive).
        for count, _ in enumerate(make()):
            if count == 2:
                raise raised("consumer failed")

    _, error = run_bounded(consume, HANG_SECONDS)
    assert isinstance(error, raised)
    assert producer_threads() == []  # at once: the loop's iterator is dropped as the exception leaves the loop
    del error


def test_a_producers_exception_is_the_original_object_through_get_and_iteration():
    failures = {}

    def produce(seq, slot):
        if seq == 4:
            failures[seq] = LookupError("bad record in batch 4")
            raise failures[seq]
        slot["value"].fill_(seq)
        return True

    for via in ("get", "for"):
        failures.clear()

        def consume():
            got = []
            queue = PinnedRingQueue(SPEC, produce, num_producers=3, num_slots=2)
            try:
                if via == "get":
                    while True:
                        got.append(queue.get()[0])
                for seq, _ in queue:
                    got.append(seq)
            except LookupError as error:
                return got, error
            finally:
                queue.close()

        (got, error), unexpected = run_bounded(consume, HANG_SECONDS)
        assert unexpected is None, repr(unexpected)
        assert got == [0, 1, 2, 3] and error is failures[4]
        assert any("producing batch 4" in note for note in error.__notes__)
        assert_no_producers_left()


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_a_base_exception_in_a_producer_reaches_the_consumer(raised):
    def produce(seq, slot):
        if seq == 2:
            raise raised("from a producer")
        return True

    def consume():
        with PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=2) as queue:
            return [seq for seq, _ in queue]

    _, error = run_bounded(consume, HANG_SECONDS)
    assert isinstance(error, raised) and any("producing batch 2" in note for note in error.__notes__)
    assert_no_producers_left()


def test_close_from_another_thread_wakes_a_consumer_waiting_on_an_empty_queue():
    release = threading.Event()

    def produce(seq, slot):
        release.wait()
        return False

    queue = PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=2)
    closer = threading.Timer(0.2, queue.close)
    closer.start()
    started = time.monotonic()
    try:
        _, error = run_bounded(queue.get)
    finally:
        release.set()
        closer.join(HANG_SECONDS)
    assert isinstance(error, RuntimeError) and "after close" in str(error)
    assert time.monotonic() - started < 2.0
    assert queue.close(timeout=None) and queue.alive_producers == 0
    assert_no_producers_left()


def test_close_twice_and_from_two_threads_while_producers_block_on_a_full_ring():
    queue = PinnedRingQueue(SPEC, delayed_producer(10**6, 0, 0.0), num_producers=4, num_slots=2)
    deadline = time.monotonic() + 5
    while queue.stats.produced < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.stats.produced == 2  # the ring is full: every producer waits for a slot
    results = []
    closers = [threading.Thread(target=lambda: results.append(queue.close()), daemon=True) for _ in range(2)]
    started = time.monotonic()
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(HANG_SECONDS)
    assert results == [True, True] and time.monotonic() - started < 1.0
    assert queue.close() and queue.close(timeout=0)
    with pytest.raises(RuntimeError, match="after close"):
        queue.get()
    assert_no_producers_left()


def test_close_with_a_zero_timeout_returns_at_once_and_the_slow_producer_exits_after_its_produce():
    entered, release = threading.Event(), threading.Event()

    def produce(seq, slot):
        entered.set()
        release.wait()
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=1, num_slots=2)
    assert entered.wait(HANG_SECONDS)
    started = time.monotonic()
    assert queue.close(timeout=0) is False and time.monotonic() - started < 0.5
    release.set()
    assert queue.close(timeout=5.0) and queue.alive_producers == 0
    with pytest.raises(RuntimeError, match="after close"):
        queue.get()
    assert_no_producers_left()


def test_the_end_of_the_stream_and_an_error_after_it():
    def produce(seq, slot):  # batch 3 does not exist; batch 5 fails: the stream ends at 3, without the error
        if seq == 5:
            raise ValueError("after the end")
        slot["value"].fill_(seq)
        return seq != 3

    def consume():
        with PinnedRingQueue(SPEC, produce, num_producers=4, num_slots=8) as queue:
            got = [seq for seq, _ in iter(queue.get, None)]
            return got, queue.get()

    (got, after), error = run_bounded(consume, HANG_SECONDS)
    assert error is None and got == [0, 1, 2] and after is None
    assert_no_producers_left()


@pytest.mark.parametrize("name,value", [("num_slots", 0), ("num_slots", -2), ("num_slots", True), ("num_slots", 2.0),
                                        ("num_producers", 0), ("num_producers", -1), ("num_producers", 1.5),
                                        ("num_producers", None)])
def test_bad_slot_and_producer_counts_are_clear_errors_and_start_no_thread(synthetic, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
        PinnedRingQueue(SPEC, lambda seq, slot: False, **{name: value})
    batcher = SessionBatcher(synthetic, "train", lanes=6, sessions_per_batch=3)
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        next(batcher.iter_queued(**{name: value}))
    assert batcher.next_index == 0
    assert producer_threads() == []

