"""Differential fuzz tests of PinnedRingQueue (and of how the lane batcher and train._Source drive it).

Every scenario is generated from a seed: a random spec (dtypes, shapes with zero-size dims), ring size (1 included),
producer count, per-batch producer delays, where the stream ends or fails, and how the consumer stops. An independent
model (a plain list of the batches a producer would write, in order, then either the end or the failure) says what
the consumer must see; the queue must deliver exactly that prefix, byte for byte, with batches the consumer holds never
overwritten, the original error object, and every producer thread joined and every slot released on every path.

Risky parts run on a daemon thread joined with a timeout (helpers.run_bounded): a hang fails, it never blocks.
"""

import gc
import random
import re
import threading
import time
import types
import warnings
import weakref

import pytest
import torch

from hiertcn_fast.data import PinnedRingQueue, SessionBatch, SessionBatcher
from hiertcn_fast.data.batcher import BATCH_FIELDS
from helpers import run_bounded
from model_helpers import one_thread  # noqa: E402,F401  (an autouse fixture: one intra-op thread)


HANG_SECONDS = 20  # only ever reached by something that hangs, which is the failure

DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.bool, torch.float32, torch.float64,
          torch.float16, torch.bfloat16]


# ---- helpers ---------------------------------------------------------------------------------------------------


def producer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("PinnedRingQueue-producer-") and t.is_alive()]


def assert_threads_back(baseline, seconds=3.0):
    """Every thread started since ``baseline`` (a set of threads) is gone within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in baseline and t.is_alive()]
        if not extra and threading.active_count() <= len(baseline):
            return
        time.sleep(0.01)
    extra = [t for t in threading.enumerate() if t not in baseline and t.is_alive()]
    assert extra == [] and threading.active_count() <= len(baseline), f"threads left running: {extra}"


def thread_baseline():
    # Waits for threads of an earlier test (none should be left) so that this test's count starts clean.
    deadline = time.monotonic() + 3.0
    while producer_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producer_threads() == [], f"producer threads of an earlier test still running: {producer_threads()}"
    return set(threading.enumerate())


def random_tensor(shape, dtype, generator):
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 50).to(dtype)
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=generator).to(dtype)


def random_spec(rng):
    spec = {}
    for i in range(rng.randint(1, 4)):
        ndim = rng.randint(0, 3)
        shape = tuple(rng.choice([0, 1, 2, 3, 5]) if rng.random() < 0.8 else 0 for _ in range(ndim))
        spec[f"f{i}"] = (shape, rng.choice(DTYPES))
    return spec


def model_batches(spec, count, seed):
    """The model: batch ``seq`` as a producer would write it, computed independently of the queue."""
    batches = []
    for seq in range(count):
        generator = torch.Generator().manual_seed(seed * 1000 + seq)
        batches.append({name: random_tensor(shape, dtype, generator) for name, (shape, dtype) in spec.items()})
    return batches


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class FuzzError(Exception):
    pass


class Producer:
    """produce(seq, slot) for a scenario: writes the model's batch, ends at ``total``, fails at ``fail_at`` (raises
    ``error`` or returns None), and checks the ring's rules as it goes."""

    def __init__(self, expected, total, num_slots, fail_at=None, fail_how="raise", delays=None, write_slowly=False,
                 resume_after_end=False):
        self.expected, self.total, self.num_slots = expected, total, num_slots
        self.fail_at, self.fail_how = fail_at, fail_how
        self.error = FuzzError(f"fuzz failure at batch {fail_at}") if fail_at is not None else None
        self.delays = delays or {}
        self.write_slowly = write_slowly
        self.resume_after_end = resume_after_end
        self.lock = threading.Lock()
        self.queue = None
        self.writing = {}  # slot index -> seq being written
        self.slot_ids = {}  # slot index -> id of the slot dict produce() got for it
        self.calls = []
        self.violations = []

    def __call__(self, seq, slot):
        with self.lock:
            self.calls.append(seq)
            pause = self.delays.get(seq, 0.0)
        if pause:
            time.sleep(pause)
        if seq == self.fail_at:
            if self.fail_how == "raise":
                raise self.error
            return None  # a forgotten return: the queue must say so, not end the stream
        if seq >= self.total and not (self.resume_after_end and seq > self.total):
            return False
        queue, key = self.queue, seq % self.num_slots
        with self.lock:
            # The ring never runs ahead: batch seq - num_slots was delivered before batch seq is written.
            if queue is not None and queue.stats.delivered < seq - self.num_slots + 1:
                self.violations.append(f"batch {seq} written with only {queue.stats.delivered} delivered")
            if key in self.writing:
                self.violations.append(f"batches {self.writing[key]} and {seq} written into slot {key} at once")
            self.writing[key] = seq
            if self.slot_ids.setdefault(key, id(slot)) != id(slot):
                self.violations.append(f"batch {seq} got another slot dict than slot {key}'s")
        try:
            if seq >= len(self.expected):  # past the end or a failure, written anyway: must never be delivered
                for tensor in slot.values():
                    if tensor.numel():
                        tensor.view(-1)[:1] = 1
                return True
            if set(slot) != set(self.expected[seq]):
                self.violations.append(f"slot fields {sorted(slot)}")
            for name, value in self.expected[seq].items():
                if self.write_slowly and value.numel():  # half written, a pause, then the rest
                    flat = slot[name].view(-1)
                    flat.fill_(value.view(-1)[0])
                    time.sleep(0.0005)
                slot[name].copy_(value)
        finally:
            with self.lock:
                del self.writing[key]
        return True


def scenario(seed):
    rng = random.Random(seed)
    spec = random_spec(rng)
    num_slots = rng.choice([1, 1, 2, 3, 4, 6])
    num_producers = rng.choice([1, 2, 3, 4])
    total = rng.randint(0, 18)
    fail_at = rng.randint(0, total + 2) if rng.random() < 0.5 else None
    fail_how = rng.choice(["raise", "raise", "none"])
    speed = rng.choice(["fast", "slow", "mixed"])
    delays = {}
    for seq in range(total + 10):
        if speed == "slow" or (speed == "mixed" and rng.random() < 0.3):
            delays[seq] = rng.uniform(0, 0.004)
    consumer = rng.choice(["iter", "get", "with_iter", "break", "close_at", "with_raise", "drop", "gen_drop"])
    stop_at = rng.randint(0, total + 1)
    consumer_delay = rng.choice([0.0, 0.0, 0.003])
    mutate = rng.random() < 0.5
    resume_after_end = rng.random() < 0.3
    return dict(spec=spec, num_slots=num_slots, num_producers=num_producers, total=total, fail_at=fail_at,
                fail_how=fail_how, delays=delays, consumer=consumer, stop_at=stop_at,
                consumer_delay=consumer_delay, mutate=mutate, write_slowly=rng.random() < 0.3,
                resume_after_end=resume_after_end, rng_seed=seed)


def run_consumer(queue, how, stop_at, delay, rng, expected, mutate, checks):
    """Consumes ``queue`` the way ``how`` says; returns (received, error, stopped_early). Every received batch is
    compared with the model at once (``checks``) and, when ``mutate``, then changed by the consumer, which owns it."""
    received = []

    def take(seq, tensors):
        batch = {name: tensor for name, tensor in tensors.items()}
        ok = seq < len(expected) and all(same(batch[name], expected[seq][name]) for name in expected[seq])
        checks.append((seq, ok))
        if mutate and seq % 2 == 0:
            for tensor in batch.values():
                if tensor.numel():
                    tensor.view(-1)[0] = ~tensor.view(-1)[0] if tensor.dtype == torch.bool else tensor.view(-1)[0] + 1
            received.append((seq, batch, True))
        else:
            received.append((seq, batch, False))
        if delay and rng.random() < 0.5:
            time.sleep(rng.uniform(0, delay))

    error, stopped = None, False
    try:
        if how == "iter":
            for seq, tensors in queue:
                take(seq, tensors)
        elif how == "with_iter":
            with queue:
                for seq, tensors in queue:
                    take(seq, tensors)
        elif how == "get":
            try:
                while True:
                    item = queue.get()
                    if item is None:
                        assert queue.get() is None  # the end is sticky
                        break
                    take(*item)
            finally:
                queue.close()
        elif how == "break":
            for seq, tensors in queue:
                take(seq, tensors)
                if len(received) > stop_at:
                    stopped = True
                    break
        elif how == "close_at":
            try:
                while len(received) <= stop_at:
                    item = queue.get()
                    if item is None:
                        break
                    take(*item)
                else:
                    stopped = True
            finally:
                assert queue.close() is True
        elif how == "with_raise":
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a producer still running after close() would warn: fail instead
                try:
                    with queue:
                        while True:
                            item = queue.get()
                            if item is None:
                                break
                            take(*item)
                            if len(received) > stop_at:
                                raise KeyError("consumer stops")
                except KeyError as stop:
                    assert stop.args == ("consumer stops",)
                    stopped = True
        elif how in ("drop", "gen_drop"):
            source = iter(queue) if how == "gen_drop" else None
            while len(received) <= stop_at:
                item = next(source, None) if source is not None else queue.get()
                if item is None:
                    break
                take(*item)
            else:
                stopped = True
            del source, item
        else:
            raise AssertionError(how)
    except FuzzError as caught:
        error = caught
    except TypeError as caught:
        if "must return True" not in str(caught):
            raise
        error = caught
    return received, error, stopped


# ---- the differential fuzz ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(48))
def test_random_scenario_matches_the_list_model(seed):
    params = scenario(seed)
    spec, num_slots, total, fail_at = params["spec"], params["num_slots"], params["total"], params["fail_at"]
    # The model: the batches before the first missing or failed one, then the end or that failure.
    # (The first batch produce() does not write decides: a failure at ``total`` comes before the end.)
    stop = total if fail_at is None else min(total, fail_at)
    fails = fail_at is not None and fail_at <= total
    expected = model_batches(spec, stop, seed)
    baseline = thread_baseline()
    producer = Producer(expected, total, num_slots, fail_at, params["fail_how"], params["delays"],
                        params["write_slowly"], params["resume_after_end"])
    rng = random.Random(seed + 7)
    checks = []
    box = {}

    def body():
        queue = PinnedRingQueue(spec, producer, num_producers=params["num_producers"], num_slots=num_slots)
        producer.queue = queue
        box["slot_refs"] = [weakref.ref(t) for slot in queue._ring.slots for t in slot.values()]
        box["slot_ptrs"] = {t.data_ptr() for slot in queue._ring.slots for t in slot.values() if t.numel()}
        box["queue_ref"] = weakref.ref(queue)
        box["threads"] = list(queue._threads)
        how = params["consumer"]
        outcome = run_consumer(queue, how, params["stop_at"], params["consumer_delay"], rng, expected,
                               params["mutate"], checks)
        box["stats"] = queue.stats.as_dict()
        if how in ("drop", "gen_drop"):
            producer.queue = None
            del queue
            gc.collect()
            return outcome
        box["alive"] = queue.alive_producers
        box["slots_after"] = len(queue._ring.slots)
        try:  # after close(): None past the end of the stream, else RuntimeError
            box["get_after"] = queue.get()
        except RuntimeError as caught:
            box["get_after"] = str(caught)
        return outcome

    result, unexpected = run_bounded(body, HANG_SECONDS, lambda: f"scenario {params}")
    assert unexpected is None, f"{unexpected!r} in scenario {params}"
    received, error, stopped = result
    where = f"scenario {seed}: {params['consumer']}, slots {num_slots}, producers {params['num_producers']}, " \
            f"total {total}, fail_at {fail_at} ({params['fail_how']}), spec {spec}"

    seqs = [seq for seq, _, _ in received]
    if stopped:  # the consumer stopped early: a prefix of the model
        assert seqs == list(range(len(seqs))) and len(seqs) <= stop, where
        assert error is None, where
    else:
        assert seqs == list(range(stop)), where
        if fails:
            assert error is not None, f"no error: {where}"
            if params["fail_how"] == "raise":
                assert error is producer.error, where  # the original object
                assert any(f"producing batch {fail_at}" in note for note in error.__notes__), where
            else:
                assert isinstance(error, TypeError) and f"for batch {fail_at}" in str(error), where
        else:
            assert error is None, f"{error!r}: {where}"
    # Each batch equalled the model when received, and those the consumer did not change still do now, after
    # every later batch went through the ring: nothing handed out was overwritten.
    assert all(ok for _, ok in checks), f"batches differing from the model when received: {checks} ({where})"
    for seq, batch, mutated in received:
        assert set(batch) == set(spec), where
        for name, (shape, dtype) in spec.items():
            assert batch[name].shape == shape and batch[name].dtype == dtype and batch[name].device.type == "cpu"
            if batch[name].numel():
                assert batch[name].data_ptr() not in box["slot_ptrs"], f"batch {seq} is a slot ({where})"
            if not mutated:
                assert same(batch[name], expected[seq][name]), f"batch {seq} field {name} overwritten ({where})"
    assert producer.violations == [], where
    stats = box["stats"]
    assert stats["delivered"] == len(received), where
    assert stats["delivered"] <= stats["produced"] <= stats["delivered"] + num_slots, where
    assert stats["max_occupancy"] <= num_slots, where
    if params["consumer"] not in ("drop", "gen_drop"):
        assert box["alive"] == 0 and box["slots_after"] == 0, where
        after_close = "PinnedRingQueue.get() after close()"
        if not stopped and not fails:
            assert box["get_after"] is None, where
        elif stopped and len(seqs) == stop and not fails:  # stopped at the very end: either, by the race
            assert box["get_after"] in (None, after_close), where
        else:
            assert box["get_after"] == after_close, where
    # Threads joined, the queue collectable and its slots released, whatever the path.
    deadline = time.monotonic() + 3.0
    for thread in box["threads"]:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in box["threads"]), where
    del received, result
    if error is not None:
        error.__traceback__ = None  # the failed produce() frame holds a slot
    producer.error = error = producer.queue = None
    gc.collect()
    assert box["queue_ref"]() is None, where
    assert all(ref() is None for ref in box["slot_refs"]), f"slots not released: {where}"
    assert_threads_back(baseline)


def test_get_after_a_full_stream_keeps_returning_none_even_after_close():
    baseline = thread_baseline()
    spec = {"x": ((2, 0, 3), torch.float16), "y": ((), torch.int8)}
    expected = model_batches(spec, 5, 3)

    def body():
        queue = PinnedRingQueue(spec, Producer(expected, 5, 1), num_producers=3, num_slots=1)
        got = []
        while (item := queue.get()) is not None:
            got.append(item)
        assert queue.get() is None
        assert queue.close() is True
        return got, queue.get(), queue.get()

    (got, after1, after2), error = run_bounded(body, HANG_SECONDS)
    assert error is None, repr(error)
    assert [seq for seq, _ in got] == list(range(5)) and after1 is None and after2 is None
    for seq, tensors in got:
        assert all(same(tensors[name], expected[seq][name]) for name in spec)
    assert_threads_back(baseline)


@pytest.mark.parametrize("num_slots,num_producers", [(1, 1), (1, 4), (3, 2), (5, 5)])
def test_earliest_error_wins_when_several_batches_fail_in_random_order(num_slots, num_producers):
    """Several batches fail, in a random order in time: the consumer gets every batch before the earliest failed one,
    then that batch's own error object."""
    spec = {"v": ((4,), torch.int64)}
    for trial in range(6):
        rng = random.Random(100 * num_slots + 10 * num_producers + trial)
        failing = sorted(rng.sample(range(2, 14), rng.randint(2, 4)))
        errors = {seq: FuzzError(f"batch {seq}") for seq in failing}
        delays = {seq: rng.uniform(0, 0.01) for seq in range(20)}
        baseline = thread_baseline()

        def produce(seq, slot):
            time.sleep(delays.get(seq, 0))
            if seq in errors:
                raise errors[seq]
            slot["v"].fill_(seq)
            return seq < 16

        def body():
            got = []
            try:
                with PinnedRingQueue(spec, produce, num_producers=num_producers, num_slots=num_slots) as queue:
                    for seq, tensors in queue:
                        got.append((seq, tensors))
            except FuzzError as error:
                return got, error
            return got, None

        (got, error), unexpected = run_bounded(body, HANG_SECONDS)
        assert unexpected is None, repr(unexpected)
        first = failing[0]
        assert [seq for seq, _ in got] == list(range(first)), (failing, [seq for seq, _ in got])
        assert all(torch.equal(t["v"], torch.full((4,), seq)) for seq, t in got)
        assert error is errors[first], (failing, error)
        notes = [note for note in error.__notes__ if "producing batch" in note]
        assert len(notes) == 1 and re.fullmatch(rf"raised in PinnedRingQueue-producer-\d+ while producing batch {first}",
                                                notes[0]), notes
        error.__traceback__ = None
        del error
        assert_threads_back(baseline)


def test_a_consumer_holding_every_batch_of_a_one_slot_ring_under_many_producers_sees_none_overwritten():
    """The ownership rule: without CUDA the consumer receives a copy; a held batch stays as received while the
    producers (many, on one slot) write every later batch, and changing it changes no later batch."""
    spec = {"a": ((3, 2), torch.float64), "b": ((7,), torch.bool), "z": ((0, 4), torch.int32)}
    expected = model_batches(spec, 40, 11)
    baseline = thread_baseline()
    producer = Producer(expected, 40, 1, delays={seq: 0.001 for seq in range(0, 40, 3)}, write_slowly=True)

    def body():
        held = []
        with PinnedRingQueue(spec, producer, num_producers=4, num_slots=1) as queue:
            producer.queue = queue
            for seq, tensors in queue:
                snapshot = {name: tensor.clone() for name, tensor in tensors.items()}
                held.append((seq, tensors, snapshot))
                tensors["a"].mul_(-1)  # the consumer's to change
                time.sleep(0.0005)  # producers race to refill the slot meanwhile
        return held

    held, error = run_bounded(body, HANG_SECONDS)
    assert error is None, repr(error)
    assert [seq for seq, _, _ in held] == list(range(40))
    for seq, tensors, snapshot in held:
        for name in spec:
            assert same(snapshot[name], expected[seq][name]), (seq, name)
        assert same(tensors["a"], -expected[seq]["a"]) and same(tensors["b"], expected[seq]["b"]), seq
    assert producer.violations == []
    assert_threads_back(baseline)


@pytest.mark.parametrize("num_slots,num_producers", [(1, 2), (2, 1), (3, 4)])
def test_close_called_by_a_producer_stops_the_stream_with_a_prefix_and_joins_everything(num_slots, num_producers):
    """close() on a producer thread (from produce) only tells the producers to stop and returns False; the consumer
    gets a prefix of the model's batches, then RuntimeError (after close), and every thread is joined."""
    spec = {"v": ((2, 3), torch.float32)}
    expected = model_batches(spec, 30, 5)
    baseline = thread_baseline()
    inner = []

    def body():
        box = {}

        def produce(seq, slot):
            if seq == 6:
                inner.append(box["queue"].close())
            if seq >= 30:
                return False
            slot["v"].copy_(expected[seq]["v"])
            return True

        got = []
        queue = PinnedRingQueue(spec, produce, num_producers=num_producers, num_slots=num_slots)
        box["queue"] = queue
        try:
            for seq, tensors in queue:
                got.append((seq, tensors))
                time.sleep(0.001)
        except RuntimeError as error:
            box.clear()
            return got, str(error), queue.alive_producers, len(queue._ring.slots)
        box.clear()
        return got, None, queue.alive_producers, len(queue._ring.slots)

    result, unexpected = run_bounded(body, HANG_SECONDS)
    assert unexpected is None, repr(unexpected)
    got, error, alive, slots = result
    assert inner == [False]
    assert error == "PinnedRingQueue.get() after close()"
    assert [seq for seq, _ in got] == list(range(len(got))) and len(got) <= 6  # batch 6 is published after close
    assert all(same(tensors["v"], expected[seq]["v"]) for seq, tensors in got)
    assert alive == 0 and slots == 0
    assert_threads_back(baseline)


def test_independent_queues_running_at_once_each_match_their_own_model():
    """Several queues at once, each consumed on its own thread: each delivers exactly its own model's batches."""
    baseline = thread_baseline()
    runs = []
    for index in range(4):
        rng = random.Random(500 + index)
        spec = random_spec(rng)
        total = rng.randint(5, 25)
        expected = model_batches(spec, total, 500 + index)
        producer = Producer(expected, total, 1 + index % 3, delays={seq: rng.uniform(0, 0.002) for seq in range(40)})
        runs.append((spec, expected, producer, 1 + index % 3, 1 + (index * 3) % 4))
    outcomes = [None] * len(runs)

    def consume(index):
        spec, expected, producer, num_slots, num_producers = runs[index]
        with PinnedRingQueue(spec, producer, num_producers=num_producers, num_slots=num_slots) as queue:
            producer.queue = queue
            outcomes[index] = [(seq, tensors) for seq, tensors in queue]
            producer.queue = None

    consumers = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(runs))]
    for thread in consumers:
        thread.start()
    for thread in consumers:
        thread.join(HANG_SECONDS)
    assert not any(thread.is_alive() for thread in consumers), "a consumer hangs"
    for (spec, expected, producer, _, _), got in zip(runs, outcomes):
        assert got is not None and [seq for seq, _ in got] == list(range(len(expected)))
        for seq, tensors in got:
            assert all(same(tensors[name], expected[seq][name]) for name in spec), seq
        assert producer.violations == []
    assert_threads_back(baseline)


# ---- bad specs and wrong-shaped batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [((-1, 2), torch.float32), ((2.0,), torch.int64), ("34", torch.int64),
                                   ((True,), torch.int64), ((2,), "float32"), ((2,), None), (3, torch.int64),
                                   ((2,), torch.int64, "extra"), None, "ab"])
def test_a_bad_spec_entry_is_a_type_error_naming_the_field_and_starts_no_thread(entry):
    baseline = thread_baseline()
    spec = {"good": ((2, 0), torch.int64), "the_field": entry}
    with pytest.raises(TypeError, match=r"spec\['the_field'\]"):
        PinnedRingQueue(spec, lambda seq, slot: False, num_producers=3, num_slots=2)
    assert_threads_back(baseline, seconds=0.0)


@pytest.mark.parametrize("bad", ["shape", "dtype", "missing"])
def test_a_batcher_filling_a_wrongly_specced_slot_names_the_field_and_delivers_nothing(synthetic, bad):
    """The lane batcher's fill() through the queue with a spec that differs from batch_spec() in one field: the
    consumer gets fill's ValueError naming that field before any batch, and every producer stops."""
    batcher = SessionBatcher(synthetic, "train", lanes=4, sessions_per_batch=2, max_session_length=6)
    spec = dict(batcher.batch_spec())
    shape, dtype = spec["lengths"]
    if bad == "shape":
        spec["lengths"] = ((shape[0], shape[1] + 1), dtype)
    elif bad == "dtype":
        spec["lengths"] = (shape, torch.int32)
    else:
        del spec["lengths"]
    baseline = thread_baseline()

    def body():
        got = []
        with PinnedRingQueue(spec, lambda seq, slot: batcher.fill(seq, slot), num_producers=3, num_slots=2) as queue:
            for seq, _ in queue:
                got.append(seq)
        return got

    got, error = run_bounded(body, HANG_SECONDS)
    assert got is None and isinstance(error, ValueError), repr(error)
    assert "out['lengths']" in str(error) and "producing batch 0" in " ".join(error.__notes__)
    del error
    assert_threads_back(baseline)


# ---- the lane batcher and train._Source over the queue -------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from model_helpers import synthetic_cache

    return synthetic_cache(tmp_path_factory.mktemp("fuzz_ring_queue_cache"))


def batch_fields(batch):
    return {name: tensor.clone() for name, tensor in batch.tensors().items()}


def assert_same_batch(got, want, where):
    assert (got.epoch, got.index) == (want.epoch, want.index), where
    width = want.items.shape[2]
    assert (got.items[..., width:] == 0).all() and torch.equal(got.items[..., :width], want.items), where
    for name in BATCH_FIELDS:
        if name != "items":
            assert torch.equal(getattr(got, name), getattr(want, name)), (where, name)


def run_batcher(make, queued, fail_index, stop_after, seed, num_producers, num_slots):
    """Iterate a fresh batcher directly or through iter_queued; ``_write`` fails at ``fail_index``; the consumer
    stops (break) after ``stop_after`` batches. Returns (batches, error, (epoch, next_index))."""
    batcher = make()
    real_write, rng, lock = batcher._write, random.Random(seed), threading.Lock()
    failure = FuzzError("bad batch")

    def write(epoch, index, out):
        with lock:
            pause = rng.uniform(0, 0.002) if queued else 0.0
        time.sleep(pause)
        if index == fail_index:
            raise failure
        return real_write(epoch, index, out)

    batcher._write = write
    got, error = [], None
    try:
        stream = batcher.iter_queued(num_producers, num_slots) if queued else iter(batcher)
        for batch in stream:
            got.append(SessionBatch.from_tensors(batch_fields(batch), batch.epoch, batch.index))
            if stop_after is not None and len(got) >= stop_after:
                break
        del stream
    except FuzzError as caught:
        assert caught is failure
        error = caught
    return got, error, (batcher.epoch, batcher.next_index)


@pytest.mark.parametrize("seed", range(8))
def test_iter_queued_matches_direct_iteration_with_failures_and_early_stops(synthetic, seed):
    rng = random.Random(seed)
    lanes, steps, length = rng.choice([2, 3, 5]), rng.choice([1, 2, 4]), rng.choice([3, 8, 20])
    resume_at = rng.choice([0, 0, 1, 3])
    num_producers, num_slots = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])

    def make():
        batcher = SessionBatcher(synthetic, "train", lanes=lanes, sessions_per_batch=steps, max_session_length=length,
                                 shuffle=True, seed=seed)
        batcher.load_state_dict({**batcher.state_dict(), "epoch": 1, "next_index": resume_at})
        return batcher

    count = make().num_batches(1)
    fail_index = rng.choice([None, rng.randrange(resume_at, count)])
    stop_after = rng.choice([None, rng.randint(1, max(1, count - resume_at))])
    where = f"seed {seed}: fail_index {fail_index}, stop_after {stop_after}, resume_at {resume_at}, count {count}"
    baseline = thread_baseline()
    direct, direct_error, direct_position = run_batcher(make, False, fail_index, stop_after, seed, 1, 1)
    outcome, unexpected = run_bounded(
        lambda: run_batcher(make, True, fail_index, stop_after, seed, num_producers, num_slots), HANG_SECONDS)
    assert unexpected is None, f"{unexpected!r} ({where})"
    queued, queued_error, queued_position = outcome
    assert len(queued) == len(direct), where
    for got, want in zip(queued, direct):
        assert_same_batch(got, want, where)
    assert (queued_error is None) == (direct_error is None), where
    assert queued_position == direct_position, where
    del outcome, queued_error, direct_error
    assert_threads_back(baseline)


def make_source(synthetic, num_producers, queue_slots, lanes=4, steps=2, length=6):
    from hiertcn_fast.train import TrainConfig, _Source

    model = types.SimpleNamespace(input_kind="sessions", max_session_length=length, state_shape=None)
    config = TrainConfig(lanes=lanes, sessions_per_batch=steps, num_producers=num_producers, queue_slots=queue_slots,
                         seed=5)
    return _Source(model, synthetic, "train", config, torch.device("cpu"), shuffle=True)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("path", ["all", "break", "fail_move", "raise_in_body"])
def test_train_source_over_the_queue_matches_the_direct_source(synthetic, path, seed, monkeypatch):
    """train._Source.batches() with producers against without: the same batches, the same events, the same
    generator position after an early stop or after an error while the batch is moved (which gives it back),
    and no producer thread left on any path."""
    rng = random.Random(f"{path}{seed}")
    num_producers, num_slots = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
    stop = rng.randint(0, 4)
    real_to = SessionBatch.to

    def run(producers):
        source = make_source(synthetic, producers, num_slots)
        assert source.queued == (producers > 0)
        calls = [0]

        def to(batch, device, non_blocking=False):
            calls[0] += 1
            if path == "fail_move" and calls[0] == stop + 1:
                raise FuzzError("move failed")
            return real_to(batch, device, non_blocking)

        monkeypatch.setattr(SessionBatch, "to", to)
        got, error = [], None
        try:
            for batch, events in source.batches():
                got.append((SessionBatch.from_tensors(batch_fields(batch), batch.epoch, batch.index), events))
                if path == "break" and len(got) > stop:
                    break
                if path == "raise_in_body" and len(got) > stop:
                    raise FuzzError("consumer failed")
        except FuzzError as caught:
            error = str(caught)
        finally:
            monkeypatch.setattr(SessionBatch, "to", real_to)
        return got, error, (source.batcher.epoch, source.batcher.next_index)

    source_batches = make_source(synthetic, 0, 1).num_batches(0)
    baseline = thread_baseline()
    direct = run(0)
    queued, unexpected = run_bounded(lambda: run(num_producers), HANG_SECONDS)
    assert unexpected is None, repr(unexpected)
    where = f"seed {seed}: {path} at {stop}, producers {num_producers}, slots {num_slots}"
    assert len(queued[0]) == len(direct[0]), where
    for (got, got_events), (want, want_events) in zip(queued[0], direct[0]):
        assert_same_batch(got, want, where)
        assert got_events == want_events == int(want.lengths.sum()), where
    assert queued[1] == direct[1], where
    assert queued[2] == direct[2], where
    if path == "fail_move" and stop < source_batches:  # the batch that failed to move is given back
        assert direct[2] == (0, stop) and direct[1] == "move failed", where
    assert_threads_back(baseline)
