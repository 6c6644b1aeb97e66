"""PinnedRingQueue: exactly-once ordered delivery, back-pressure, errors, shutdown, no leaks."""

import gc
import inspect
import os
import random
import signal
import sys
import threading
import time
import traceback
import weakref

import pytest
import torch

from hiertcn_fast.data import PinnedRingQueue, PreprocessParams, SessionBatcher, load_dataset, preprocess
from hiertcn_fast.data import ring_queue
from helpers import run_bounded

SPEC = {"value": ((3, 5), torch.int64), "flag": ((7,), torch.bool), "weight": ((2,), torch.float32)}


def counting_producer(total, queue_box, num_slots, delay=0.0, seed=0):
    """Writes batch ``seq`` as the constant ``seq``; checks the ring never runs ahead."""
    rng = random.Random(seed)
    lock = threading.Lock()
    violations = []

    def produce(seq, slot):
        if seq >= total:
            return False
        queue = queue_box[0]
        if queue is not None and seq >= queue.stats.delivered + num_slots:
            violations.append(seq)
        if delay:
            with lock:
                pause = rng.uniform(0, delay)
            time.sleep(pause)
        slot["value"].fill_(seq)
        slot["flag"].fill_(seq % 2 == 1)
        slot["weight"].fill_(seq * 0.5)
        return True

    return produce, violations


@pytest.mark.parametrize("num_slots", [1, 2, 5])
def test_exactly_once_in_order_under_four_producers_and_random_delays(num_slots):
    total = 150
    box = [None]
    produce, violations = counting_producer(total, box, num_slots, delay=0.002, seed=num_slots)
    rng = random.Random(42)
    received = []
    with PinnedRingQueue(SPEC, produce, num_producers=4, num_slots=num_slots) as queue:
        box[0] = queue
        for seq, tensors in queue:
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.004))
            received.append((seq, tensors))
        assert queue.get() is None and queue.get() is None  # the end is sticky
        stats = queue.stats.as_dict()
    assert queue.alive_producers == 0
    assert [seq for seq, _ in received] == list(range(total))
    for seq, tensors in received:  # delivered tensors are the consumer's: never overwritten later
        assert (tensors["value"] == seq).all() and tensors["value"].shape == (3, 5)
        assert (tensors["flag"] == (seq % 2 == 1)).all() and (tensors["weight"] == seq * 0.5).all()
    assert violations == []
    assert stats["delivered"] == total and 1 <= stats["max_occupancy"] <= num_slots
    assert stats["consumer_wait_seconds"] > 0  # producer_wait_seconds: test_back_pressure_blocks_producers_when_full


def test_back_pressure_blocks_producers_when_full():
    produced = []

    def produce(seq, slot):
        produced.append(seq)
        slot["value"].fill_(seq)
        return True

    with PinnedRingQueue(SPEC, produce, num_producers=4, num_slots=3) as queue:
        time.sleep(0.2)
        assert sorted(produced) == [0, 1, 2]  # only as many as slots, with nothing consumed
        assert queue.get()[0] == 0
        time.sleep(0.2)
        assert sorted(produced) == [0, 1, 2, 3]
        # Batch 3's producer waited on the full ring through the first sleep, and its wait is counted.
        assert queue.stats.producer_wait_seconds >= 0.15


def failing_produce(seq, slot):
    if seq == 5:
        raise ValueError("bad record in batch 5")
    slot["value"].fill_(seq)
    return True


def test_producer_exception_reaches_consumer_with_traceback():
    seen = []
    with pytest.raises(ValueError, match="bad record in batch 5") as caught:
        with PinnedRingQueue(SPEC, failing_produce, num_producers=4, num_slots=2) as queue:
            for seq, _ in queue:
                seen.append(seq)
    assert seen == [0, 1, 2, 3, 4]
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "failing_produce" in frames and "produce_batch" in frames
    assert any("producing batch 5" in note for note in caught.value.__notes__)
    assert queue.alive_producers == 0


WATCHDOG_SECONDS = 30  # only ever reached by a consumer that hangs, which is the failure


def consume_on_a_thread(queue):
    """Iterate ``queue`` on another thread so that a consumer that hangs fails the test instead of
    blocking it. Returns (sequence numbers received, the exception that ended the loop or None)."""
    got = []

    def consume():
        for seq, _ in queue:
            got.append(seq)

    _, error = run_bounded(consume, WATCHDOG_SECONDS,
                           lambda: f"(consumer after {got}, producers alive: {queue.alive_producers})")
    return got, error


def test_earliest_failed_batch_wins_when_a_later_batch_fails_first():
    later_failed = threading.Event()
    later_thread = []

    def produce(seq, slot):
        if seq == 3:
            later_failed.wait()
            later_thread[0].join()  # batch 5's error is recorded: its thread has exited
            raise ValueError("bad batch 3")
        if seq == 5:
            later_thread.append(threading.current_thread())
            later_failed.set()
            raise ValueError("bad batch 5")
        if seq >= 8:
            return False
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=3, num_slots=8)
    got, error = consume_on_a_thread(queue)
    assert got == [0, 1, 2]
    assert isinstance(error, ValueError) and str(error) == "bad batch 3"
    assert any("producing batch 3" in note for note in error.__notes__)
    assert queue.alive_producers == 0


def test_an_error_while_waiting_for_a_slot_event_reaches_the_consumer():
    # Stands in for a CUDA event whose synchronize() fails (any device: slots 0 and 1 are taken
    # before the broken events go in, so batches 2 and 3 meet them).
    class BrokenEvent:
        def synchronize(self):
            raise RuntimeError("event synchronize failed")

    both_started = threading.Barrier(3)
    events_replaced = threading.Event()

    def produce(seq, slot):
        if seq < 2:
            both_started.wait()
            events_replaced.wait()
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=2)
    both_started.wait()
    queue._ring.copy_done = [BrokenEvent(), BrokenEvent()]
    events_replaced.set()
    got, error = consume_on_a_thread(queue)
    assert got == [0, 1]
    assert isinstance(error, RuntimeError) and str(error) == "event synchronize failed"
    assert any("producing batch 2" in note for note in error.__notes__)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_consumer_is_told_when_every_producer_is_gone_without_an_error(monkeypatch):
    # The backstop for a producer that dies outside the error path (here: the error path fails).
    def broken_record_error(ring, error, seq):
        raise RuntimeError("recording the error failed")

    monkeypatch.setattr(ring_queue._Ring, "record_error", broken_record_error)
    queue = PinnedRingQueue(SPEC, failing_produce, num_producers=1, num_slots=2)
    got, error = consume_on_a_thread(queue)
    assert got == [0, 1, 2, 3, 4]
    assert isinstance(error, RuntimeError) and "all producer threads exited before batch 5" in str(error)


def endless_produce(seq, slot):
    slot["value"].fill_(seq)
    return True


def slot_tensor_refs(queue):
    """Weak references to every slot tensor, per slot."""
    return [[weakref.ref(tensor) for tensor in slot.values()] for slot in queue._ring.slots]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("path", ["end", "early_break", "producer_error"])
def test_close_releases_the_slots_while_the_queue_is_still_referenced(path, device):
    produce = {"end": lambda seq, slot: seq < 6, "early_break": endless_produce,
               "producer_error": failing_produce}[path]
    queue = PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=3, device=device)
    assert queue._ring.slots[0]["value"].is_pinned() == (device == "cuda")
    refs = slot_tensor_refs(queue)
    caught = None
    if path == "producer_error":
        with pytest.raises(ValueError, match="batch 5") as caught:
            for _ in queue:
                pass
    else:
        for seq, _ in queue:
            if path == "early_break" and seq == 1:
                break
    queue.close()
    gc.collect()
    assert queue.alive_producers == 0
    # Also while the caller holds a producer's error: its traceback's produce() frame held the slot it was filling
    # (slot 5 % 3 stayed alive until the error was dropped). The frames are kept, their variables are not.
    assert all(ref() is None for slot_refs in refs for ref in slot_refs)
    if caught is not None:
        frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert "failing_produce" in frames and "produce_batch" in frames


def test_a_dropped_queue_is_collected_and_stops_its_threads():
    queue = PinnedRingQueue(SPEC, endless_produce, num_producers=3, num_slots=2)
    assert queue.get()[0] == 0
    threads = list(queue._threads)
    refs = slot_tensor_refs(queue)
    queue_ref = weakref.ref(queue)
    del queue  # never closed: the producers must not keep it alive
    gc.collect()
    assert queue_ref() is None
    for thread in threads:
        thread.join(WATCHDOG_SECONDS)
    assert not any(thread.is_alive() for thread in threads)
    gc.collect()
    assert all(ref() is None for slot_refs in refs for ref in slot_refs)


def test_leaving_a_for_loop_closes_the_queue():
    queue = PinnedRingQueue(SPEC, endless_produce, num_producers=3, num_slots=2)
    for seq, _ in queue:
        if seq == 1:
            break
    assert queue.alive_producers == 0 and queue._ring.slots == []
    with pytest.raises(RuntimeError, match="after close"):
        queue.get()
    iterator = iter(PinnedRingQueue(SPEC, lambda seq, slot: seq < 4, num_producers=2, num_slots=2))
    assert [seq for seq, _ in iterator] == [0, 1, 2, 3]
    assert iterator.gi_frame is None  # the generator finished; its queue was closed on the way out


def blocking_produce():
    """A produce() that signals ``entered`` and then waits for ``release`` (and ends the stream)."""
    entered, release = threading.Event(), threading.Event()

    def produce(seq, slot):
        entered.set()
        release.wait()
        return False

    return entered, release, produce


def test_leaving_with_normally_waits_for_a_slow_produce():
    entered, release, slow = blocking_produce()
    with PinnedRingQueue(SPEC, slow, num_producers=1) as queue:
        entered.wait()
        # Outlasts close()'s default deadline: a bounded join would leave the producer running.
        threading.Timer(ring_queue.JOIN_SECONDS + 0.5, release.set).start()
    assert release.is_set() and queue.alive_producers == 0


def test_leaving_with_by_an_exception_warns_about_a_producer_still_running():
    entered, release, stuck = blocking_produce()
    try:
        with pytest.warns(RuntimeWarning, match="1 producer thread.* still running"):
            with pytest.raises(KeyError, match="consumer failed"):
                with PinnedRingQueue(SPEC, stuck, num_producers=1) as queue:
                    entered.wait()
                    raise KeyError("consumer failed")
        assert queue.alive_producers == 1
    finally:
        release.set()
    assert queue.close(timeout=None) and queue.alive_producers == 0


def test_a_producer_that_fails_to_start_stops_those_already_started(monkeypatch):
    started = []
    real_start = threading.Thread.start

    def start(thread):
        if thread.name.startswith("PinnedRingQueue-producer-"):
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        PinnedRingQueue(SPEC, endless_produce, num_producers=4, num_slots=2)
    assert len(started) == 2 and not any(thread.is_alive() for thread in started)


def test_early_close_joins_every_thread_within_a_second():
    def slow(seq, slot):
        time.sleep(0.05)
        slot["value"].fill_(seq)
        return True

    before = threading.active_count()
    queue = PinnedRingQueue(SPEC, slow, num_producers=4, num_slots=4)
    for seq, _ in queue:
        if seq == 2:
            break
    started = time.perf_counter()
    assert queue.close()
    assert time.perf_counter() - started < 1.0
    assert queue.alive_producers == 0 and threading.active_count() == before
    with pytest.raises(RuntimeError, match="after close"):
        queue.get()


def test_keyboard_interrupt_while_waiting_closes_cleanly():
    def slow(seq, slot):
        time.sleep(0.3)
        return True

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = threading.active_count()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            with PinnedRingQueue(SPEC, slow, num_producers=3, num_slots=2) as queue:
                queue.get()  # blocks: the first batch takes 0.3 s
        assert time.perf_counter() - started < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert queue.alive_producers == 0 and threading.active_count() == before


@pytest.fixture(scope="module")
def ml100k_cache(tmp_path_factory):
    params = PreprocessParams(min_item_count=5, min_user_count=5, max_user_count=None, num_partitions=4)
    return preprocess(load_dataset("ml-100k"), tmp_path_factory.mktemp("ml100k_queue"), params)


def make_batcher(cache):
    return SessionBatcher(cache, "train", lanes=8, sessions_per_batch=4, max_session_length=20)


def test_abandoned_generator_closes_the_queue(ml100k_cache):
    before = threading.active_count()
    iterator = make_batcher(ml100k_cache).iter_queued(num_producers=4, num_slots=2)
    next(iterator)
    iterator.close()  # what garbage collection of an abandoned loop does
    assert threading.active_count() == before


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_many_open_close_cycles_do_not_grow_threads_or_memory():
    before_threads = threading.active_count()
    big_spec = {"x": ((256, 1024), torch.float32)}  # 1 MiB per slot: a leak would show

    def produce(seq, slot):
        return seq < 3

    for _ in range(10):  # warm-up: allocator pools settle
        with PinnedRingQueue(big_spec, produce, num_producers=4, num_slots=4) as queue:
            list(queue)
    before_rss = rss_bytes()
    for cycle in range(150):
        with PinnedRingQueue(big_spec, produce, num_producers=4, num_slots=4) as queue:
            if cycle % 2:
                list(queue)
            else:
                queue.get()
    assert threading.active_count() == before_threads
    assert rss_bytes() - before_rss < 64 << 20


def test_spec_and_argument_validation():
    ok = lambda seq, slot: False  # noqa: E731
    with pytest.raises(TypeError, match="spec"):
        PinnedRingQueue({}, ok)
    with pytest.raises(TypeError, match=r"spec\['x'\]"):
        PinnedRingQueue({"x": (3, torch.int64)}, ok)
    with pytest.raises(TypeError, match=r"spec\['x'\]"):
        PinnedRingQueue({"x": ((3,), "int64")}, ok)
    with pytest.raises(TypeError, match="produce"):
        PinnedRingQueue(SPEC, None)
    with pytest.raises(ValueError, match="num_slots"):
        PinnedRingQueue(SPEC, ok, num_slots=0)
    with pytest.raises(ValueError, match="num_producers"):
        PinnedRingQueue(SPEC, ok, num_producers=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PinnedRingQueue(SPEC, ok, device="cuda")
    with pytest.raises(ValueError, match="device meta holds no data"):  # its batches would arrive without values
        PinnedRingQueue(SPEC, ok, device="meta")
    with PinnedRingQueue(SPEC, ok) as empty:
        assert list(empty) == []


def test_batcher_through_queue_equals_direct_batches(ml100k_cache):
    ml100k_batcher = make_batcher(ml100k_cache)
    direct = [ml100k_batcher.batch(index) for index in range(ml100k_batcher.num_batches())]
    queued = list(ml100k_batcher.iter_queued(num_producers=4, num_slots=3))
    assert [b.index for b in queued] == list(range(len(direct)))
    for want, got in zip(direct, queued):
        width = want.items.shape[2]
        assert (got.items[..., width:] == 0).all()
        assert torch.equal(got.items[..., :width], want.items)
        for name in ("lengths", "step_widths", "valid", "keep", "user", "session", "continues"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.gpu
def test_cuda_copies_from_pinned_slots_never_overwrite_batches_in_use():
    total, num_slots = 60, 2
    box = [None]
    produce, violations = counting_producer(total, box, num_slots)
    with PinnedRingQueue(SPEC, produce, num_producers=4, num_slots=num_slots, device="cuda") as queue:
        box[0] = queue
        assert all(t.is_pinned() for slot in queue._ring.slots for t in slot.values())
        kept = []
        for seq, tensors in queue:
            torch.cuda._sleep(200_000)  # keep the consumer stream busy so copies race ahead
            assert tensors["value"].is_cuda
            kept.append((seq, tensors["value"] * 1))
        torch.cuda.synchronize()
    assert [seq for seq, _ in kept] == list(range(total))
    assert all((value == seq).all().item() for seq, value in kept)
    assert violations == []


def test_an_interrupt_anywhere_in_get_leaves_the_lock_free_and_close_joins():
    """The ring's ``with ring.condition:`` blocks went through threading.Condition's Python-level __exit__: a Ctrl-C
    at its entry skipped the release, the lock stayed held, and the consumer's own close() blocked forever (a
    training run hung this way in the sweep). Interrupted at every line of get() and at the entry of every Python
    function it calls, the lock must be free afterwards and close() must join the producers."""
    spec = {"x": ((2,), torch.int64)}

    def produce(seq, slot):
        slot["x"].fill_(seq)
        return seq < 50

    get_code = PinnedRingQueue.get.__code__
    # A with line's events include its exit, which a real signal cannot split (the C lock's __exit__ is one call,
    # and signals are taken after calls return), while a traced raise there skips the release: those lines are left
    # out (the entry of each with is the previous line's end, where a call had just returned).
    lines, first = inspect.getsourcelines(PinnedRingQueue.get)
    with_lines = {first + i for i, line in enumerate(lines) if line.strip().startswith("with ")}
    for n in range(1, 200):
        queue = PinnedRingQueue(spec, produce, num_producers=1, num_slots=2)
        count, fired = [0], []

        def tracer(frame, event, arg):
            if fired:
                return None
            inside = frame.f_code is get_code
            if (event == "call" and frame.f_back is not None and frame.f_back.f_code is get_code) or (
                    event == "line" and inside and frame.f_lineno not in with_lines):
                count[0] += 1
                if count[0] == n:
                    fired.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                    raise KeyboardInterrupt("simulated Ctrl-C")
            return tracer if inside else None

        sys.settrace(tracer)
        try:
            queue.get()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        lock = queue._ring.condition._lock  # (the ring's lock, which the condition waits on; reentrant)
        held = lock._is_owned()
        if held:
            lock.release()  # let this test's queue close instead of hanging
        closed = queue.close()
        assert not held and closed, f"interrupted at {fired}: lock held {held}, producers joined {closed}"
        if not fired:
            break
    assert n > 10


def test_a_held_chained_producer_error_keeps_no_slot_alive():
    """The slot reached through the errors a producer's error was raised from (``raise ... from``) or during is not
    kept alive by the caller's hold on it either."""
    def parse(seq, slot):
        slot["value"].fill_(seq)
        raise KeyError(f"record {seq}")

    def produce(seq, slot):
        if seq < 2:
            slot["value"].fill_(seq)
            return True
        try:
            parse(seq, slot)
        except KeyError as error:
            try:
                raise LookupError("while parsing") from error
            except LookupError:
                raise ValueError(f"bad batch {seq}")  # __context__: the LookupError, whose __cause__ is the KeyError

    queue = PinnedRingQueue(SPEC, produce, num_producers=1, num_slots=2)
    refs = slot_tensor_refs(queue)
    with pytest.raises(ValueError, match="bad batch 2") as caught:
        for _ in queue:
            pass
    queue.close()
    gc.collect()
    assert isinstance(caught.value.__context__.__cause__, KeyError)
    assert all(ref() is None for slot_refs in refs for ref in slot_refs)
    inner = [frame.name for frame in traceback.extract_tb(caught.value.__context__.__cause__.__traceback__)]
    assert inner[-1] == "parse"
