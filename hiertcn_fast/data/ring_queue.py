"""A bounded ring of preallocated (pinned) host slots, filled by producer threads, delivered to
the consumer as device tensors in sequence order.

Protocol. Batches are numbered 0, 1, 2, ...; batch ``seq`` always lives in slot ``seq % slots``.
Producers claim sequence numbers in order and call ``produce(seq, slot_tensors)``, which writes the
batch in place and returns True, or returns False when there is no batch ``seq`` (the stream ends
at the first such ``seq``). A producer may only write batch ``seq`` once batch ``seq - slots`` has
been delivered and, on CUDA, once that batch's host-to-device copy has finished (the slot's CUDA
event): so a slot is never overwritten while it is still being read. The consumer takes batches
strictly in sequence order, so nothing is lost, duplicated or reordered whatever the producers'
timing; a full ring blocks producers (back-pressure).

Copies. With CUDA, slots are pinned and the consumer's copy is ``non_blocking`` on a side stream;
the consumer's current stream waits on the copy's event before using the tensors, and the tensors
are marked as used on that stream so the caching allocator does not recycle them early. Without
CUDA, slots are pageable and the consumer receives a copy (``clone``) with the same semantics.

Errors. An exception anywhere in a producer's work on batch ``seq`` (waiting for its slot, the
slot's CUDA event, ``produce`` itself) is re-raised in the consumer (the original exception object,
traceback included, with a note naming the thread and batch) once the consumer reaches batch
``seq``; all earlier batches are delivered first. When several batches fail, the consumer gets the
error of the earliest one, whichever failed first in time. Should every producer thread be gone
while the next batch is neither ready nor past the end, :meth:`PinnedRingQueue.get` raises
instead of waiting for a batch that cannot come.

Shutdown. ``close()`` wakes and joins every producer and releases the slots (the pinned memory).
Waits poll every 50 ms, so this takes well under a second unless a ``produce`` call itself is slow.
Leaving a ``with`` block or a ``for`` loop over the queue closes it, and a queue that is dropped
without being closed stops its threads: they hold the ring they fill, never the queue itself, so
the queue can be garbage collected, which tells them to exit.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import warnings
import weakref
from typing import Callable, Iterator

import numpy as np
import torch

from .._ints import is_int

__all__ = ["PinnedRingQueue", "QueueStats"]

POLL_SECONDS = 0.05
JOIN_SECONDS = 1.0


class QueueStats:
    """Counters of one queue. Times in seconds; occupancy = ready slots seen by each get()."""

    def __init__(self, slots: int):
        self.slots = slots
        self.delivered = 0
        self.produced = 0
        self.consumer_wait_seconds = 0.0
        self.producer_wait_seconds = 0.0
        self.produce_seconds = 0.0
        self.occupancy_sum = 0
        self.occupancy_max = 0

    def as_dict(self) -> dict:
        mean_occupancy = self.occupancy_sum / self.delivered if self.delivered else 0.0
        return {"slots": self.slots, "delivered": self.delivered, "produced": self.produced,
                "consumer_wait_seconds": self.consumer_wait_seconds,
                "producer_wait_seconds": self.producer_wait_seconds, "produce_seconds": self.produce_seconds,
                "mean_occupancy": mean_occupancy, "max_occupancy": self.occupancy_max}


def _check_spec(spec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not isinstance(spec, dict) or not spec:
        raise TypeError(f"spec must be a non-empty dict of name -> (shape, dtype), got {type(spec).__name__}")
    checked = {}
    for name, entry in spec.items():
        try:
            shape, dtype = entry
        except (TypeError, ValueError):
            raise TypeError(f"spec[{name!r}] must be (shape, dtype), got {entry!r}") from None
        # A shape is a sequence of integers: int() would truncate 2.9, read "34" as (3, 4) and True as 1.
        if (not isinstance(shape, (tuple, list, torch.Size)) or not isinstance(dtype, torch.dtype)
                or not all(is_int(n) and n >= 0 for n in shape)):
            raise TypeError(f"spec[{name!r}] must be (shape: a tuple of non-negative ints, torch.dtype), got "
                            f"{entry!r}")
        checked[name] = (tuple(int(n) for n in shape), dtype)
    return checked


class _Ring:
    """The state shared by the consumer and the producer threads, and the producers' loop.

    The threads run :meth:`run_producer` of this object and never see the
    :class:`PinnedRingQueue`, so a queue nobody references can be collected (its finalizer calls
    :meth:`abandon`). Every field below the slots is guarded by ``lock`` (``condition`` waits on it).
    """

    def __init__(self, spec, produce, num_slots: int, device: torch.device, pin_memory: bool):
        self.produce = produce
        self.num_slots = num_slots
        self.slots = [{name: torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
                       for name, (shape, dtype) in spec.items()} for _ in range(num_slots)]
        self.copy_stream = None
        self.copy_done: list = [None] * num_slots
        if device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(device)
            self.copy_done = [torch.cuda.Event() for _ in range(num_slots)]
        # Held through ``with lock`` (a C lock, whose release an interrupt cannot skip), never ``with condition``,
        # whose Python-level __exit__ a Ctrl-C landing at its entry would skip: the lock stayed held and close() hung.
        # Reentrant only for close() called by a signal handler on a thread inside get(); nothing else nests it.
        self.lock = threading.RLock()
        self.condition = threading.Condition(self.lock)  # producers wait on it for their slots
        # The consumer (on the main thread, where a Ctrl-C lands) never waits with the lock held: Condition.wait
        # gives it back in Python code (a Ctrl-C there left the lock released, and get()'s ``with`` then
        # released it again, or released a producer's hold). It leaves the lock and waits on this C-level queue,
        # which wake_consumer feeds one token per wait (consumer_waiting is set under the lock as it decides to).
        self.wakeup = queue.SimpleQueue()
        self.consumer_waiting = False
        # Producer threads started and not yet past run_producer, counted by the producers themselves: get() reads
        # this, not Thread.is_alive(), whose Python code a Ctrl-C can interrupt into marking a running thread
        # stopped (CPython 3.11: the exception path of _wait_for_tstate_lock releases the thread's own lock).
        self.running = 0
        self.ready_seq = [-1] * num_slots  # which batch each slot holds, -1 when none
        self.next_claim = 0
        self.next_deliver = 0
        self.end_seq: int | None = None
        self.error: tuple[BaseException, str, int] | None = None
        self.closed = False
        self.stats = QueueStats(num_slots)

    def stream_over(self, seq: int) -> bool:
        # Batches before a failed one are still produced, so the consumer gets all of them first.
        return (self.closed or (self.error is not None and seq > self.error[2])
                or (self.end_seq is not None and seq >= self.end_seq))

    def run_producer(self) -> None:
        try:
            self.produce_batches()
        finally:
            with self.lock:
                self.running -= 1
                self.wake_consumer()

    def produce_batches(self) -> None:
        while True:
            with self.lock:
                seq = self.next_claim
                if self.stream_over(seq):
                    return
                self.next_claim += 1
            try:
                if not self.produce_batch(seq):
                    return
            except BaseException as error:  # noqa: B902 - every failure must reach the consumer
                self.record_error(error, seq)
                return

    def produce_batch(self, seq: int) -> bool:
        """Wait for batch ``seq``'s slot, fill it and publish it. False when the stream is over."""
        slot = seq % self.num_slots
        with self.lock:
            waited_from = time.perf_counter()
            while not self.stream_over(seq) and seq >= self.next_deliver + self.num_slots:
                self.condition.wait(POLL_SECONDS)
            self.stats.producer_wait_seconds += time.perf_counter() - waited_from
            if self.stream_over(seq):
                return False
            # Taken under the lock: close() drops the ring's lists, not what a producer holds.
            slot_tensors, copy_done = self.slots[slot], self.copy_done[slot]
        if copy_done is not None:
            copy_done.synchronize()  # the previous batch's copy out of this slot
        started = time.perf_counter()
        held = dict(slot_tensors)  # produce() writes into the tensors; the slot's entries are put back if it rebinds
        produced = self.produce(seq, slot_tensors)
        changed = sorted(set(held) ^ set(slot_tensors) |
                         {name for name in held.keys() & slot_tensors.keys() if held[name] is not slot_tensors[name]})
        if changed:
            slot_tensors.clear()
            slot_tensors.update(held)
            raise TypeError(f"produce(seq, slot) must write into the slot's tensors in place (slot[name][...] = values "
                            f"or slot[name].copy_(values)), not replace, add or remove entries; batch {seq} changed "
                            f"{changed}")
        if not isinstance(produced, (bool, np.bool_)):  # None (a forgotten return) would end the stream unseen
            raise TypeError(f"produce(seq, slot) must return True (batch written) or False (no batch seq), got "
                            f"{produced!r} for batch {seq}")
        produced = bool(produced)
        with self.lock:
            self.stats.produce_seconds += time.perf_counter() - started
            if produced:
                self.ready_seq[slot] = seq
                self.stats.produced += 1
            elif self.end_seq is None or seq < self.end_seq:
                self.end_seq = seq
            self.wake_all()
        return produced

    def wake_consumer(self) -> None:
        """Under the lock: wake a consumer waiting in get() (see ``wakeup``)."""
        if self.consumer_waiting:
            self.consumer_waiting = False
            self.wakeup.put(None)

    def wake_all(self) -> None:
        """Under the lock: wake the producers waiting for a slot and the consumer waiting for a batch."""
        self.condition.notify_all()
        self.wake_consumer()

    def record_error(self, error: BaseException, seq: int) -> None:
        """Keep the error of the earliest failed batch: the consumer stops there, and a later
        batch's error must not hide it (nor make producers stop before it)."""
        name = threading.current_thread().name
        # The traceback's finished frames (produce() and what it called) hold the slot being filled, and their
        # locals would keep that pinned block alive for as long as the caller holds the error, long after close().
        # The frames stay (the traceback still shows where it failed); their local variables go.
        _clear_finished_frames(error)
        with self.lock:
            if self.closed:
                return  # no consumer will ask for it: it stopped, or already got an earlier error
            if self.error is None or seq < self.error[2]:
                self.error = (error, name, seq)
                error.add_note(f"raised in {name} while producing batch {seq}")
            self.wake_all()

    def abandon(self) -> None:
        # Runs when the queue is garbage collected, possibly on a producer thread that holds the
        # lock, so it only sets the flag; the threads see it on their next poll.
        self.closed = True


def _clear_finished_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames in ``error``'s traceback and in those of the errors it
    was raised from or during (``__cause__``, ``__context__``); frames still running are left as they are."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


class PinnedRingQueue:
    """Bounded multi-producer, single-consumer queue of batches shaped by ``spec``.

    Args:
        spec: name -> (shape, dtype) of every tensor of a batch.
        produce: ``produce(seq, slot) -> bool`` writes batch ``seq`` into the CPU tensors of
            ``slot`` (a dict shaped by ``spec``); False means there is no batch ``seq``.
        num_producers: producer threads.
        num_slots: ring size (batches in flight).
        device: where the consumer wants the tensors.
        pin_memory: pin the slots (default: when ``device`` is a CUDA device; True without CUDA
            is a ValueError, since pinning needs the CUDA driver).

    Use as an iterator of ``(seq, tensors)`` or call :meth:`get`. Iterating consumes the queue:
    however the loop ends (the end of the stream, ``break``, an error, the iterator being
    dropped), the queue is closed. With :meth:`get`, always :meth:`close` it (or use ``with``).
    Leaving a ``with`` block normally waits for every producer to finish; leaving it by an
    exception waits at most about a second and warns if a producer is still running.

    An error raised by ``produce`` reaches the consumer (from :meth:`get` or the loop) with a note
    naming the producer thread and batch. Its traceback keeps every frame but not the local
    variables of the finished ones (``produce``'s and below, in the errors it was chained from too):
    they held the slot being filled, and a caller holding the error would keep that pinned block.
    """

    def __init__(self, spec, produce: Callable[[int, dict], bool], num_producers: int = 2, num_slots: int = 4,
                 device="cpu", pin_memory: bool | None = None):
        self._gave_up = False  # (close_after_error: a bounded close already waited for the producers and warned)
        self.spec = _check_spec(spec)
        if not callable(produce):
            raise TypeError(f"produce must be callable, got {type(produce).__name__}")
        for name, value in (("num_producers", num_producers), ("num_slots", num_slots)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.device = torch.device(device)
        if self.device.type == "meta":  # a meta tensor holds no values: every batch would arrive empty
            raise ValueError("device meta holds no data; the queue delivers batches to a real device (cpu, cuda)")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        if pin_memory is None:  # only a CUDA consumer copies from the slots; a CPU one would only pay for pinning
            pin_memory = self.device.type == "cuda"
        elif pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available; pass pin_memory=False "
                             "(or None: pin when CUDA is available)")
        self.pin_memory = bool(pin_memory)
        num_producers, num_slots = int(num_producers), int(num_slots)
        self.num_slots = num_slots
        self._ring = _Ring(self.spec, produce, num_slots, self.device, self.pin_memory)
        self.stats = self._ring.stats
        weakref.finalize(self, self._ring.abandon)
        self._threads: list[threading.Thread] = []
        try:
            for i in range(num_producers):
                thread = threading.Thread(target=self._ring.run_producer, name=f"PinnedRingQueue-producer-{i}",
                                          daemon=True)
                with self._ring.lock:
                    self._ring.running += 1
                try:
                    thread.start()
                except BaseException:
                    with self._ring.lock:
                        self._ring.running -= 1
                    raise
                self._threads.append(thread)
        except BaseException:
            self.close()  # the threads already running must not outlive a constructor that failed
            raise

    # ---- consumer ----------------------------------------------------------------------------

    def get(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The next batch as ``(seq, tensors on device)``, or None at the end of the stream.
        Raises a producer's exception if the next batch will never come, and RuntimeError after
        :meth:`close` or if every producer thread is gone before the next batch is ready."""
        ring = self._ring
        waited_from = time.perf_counter()
        while True:
            with ring.lock:
                seq = ring.next_deliver
                slot = seq % ring.num_slots
                if ring.end_seq is not None and seq >= ring.end_seq:
                    return None
                if ring.error is not None and seq >= ring.error[2]:
                    ring.closed = True
                    ring.condition.notify_all()
                    raise ring.error[0]
                if ring.closed:
                    raise RuntimeError("PinnedRingQueue.get() after close()")
                if ring.ready_seq[slot] == seq:
                    ring.stats.consumer_wait_seconds += time.perf_counter() - waited_from
                    occupancy = sum(1 for s in ring.ready_seq if s >= seq)
                    ring.stats.occupancy_sum += occupancy
                    ring.stats.occupancy_max = max(ring.stats.occupancy_max, occupancy)
                    host, copy_done = ring.slots[slot], ring.copy_done[slot]
                    break
                if ring.running == 0:
                    raise RuntimeError(f"PinnedRingQueue: all producer threads exited before batch {seq} was "
                                       "ready, without an error or the end of the stream")
                ring.consumer_waiting = True
            try:  # outside the lock (see _Ring.wakeup); at most POLL_SECONDS, to see producers that died
                ring.wakeup.get(timeout=POLL_SECONDS)
            except queue.Empty:
                pass
        tensors = self._copy_out(host, copy_done)
        with ring.lock:
            # One statement: an interrupt between the two stores would free the slot and leave the batch undelivered
            # (the consumer then waited for ever for a batch that no producer would publish again).
            ring.ready_seq[slot], ring.next_deliver = -1, seq + 1
            ring.stats.delivered += 1
            ring.condition.notify_all()
        return seq, tensors

    def _copy_out(self, host: dict[str, torch.Tensor], copy_done) -> dict[str, torch.Tensor]:
        copy_stream = self._ring.copy_stream
        if copy_stream is None:
            return {name: tensor.to(self.device, copy=True) for name, tensor in host.items()}
        consumer_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(copy_stream):
            # Allocated on the side stream; record_stream below keeps the allocator from reusing
            # them until the consumer stream's work on them is done.
            tensors = {name: tensor.to(self.device, non_blocking=True) for name, tensor in host.items()}
            copy_done.record(copy_stream)
        consumer_stream.wait_event(copy_done)
        for tensor in tensors.values():
            tensor.record_stream(consumer_stream)
        return tensors

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        try:
            while True:
                item = self.get()
                if item is None:
                    break
                yield item
        except BaseException:  # noqa: B902 - GeneratorExit (break, a dropped iterator) included
            self.close_after_error()
            raise
        self.close(timeout=None)

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self, timeout: float | None = JOIN_SECONDS) -> bool:
        """Stop every producer, join them (for at most ``timeout`` seconds in all; None: however
        long a running ``produce`` call takes) and release the slots and any producer's error
        (later calls to :meth:`get` raise RuntimeError, or return None past the end of the
        stream). Returns True if all joined.

        A producer still running past the deadline only finishes its ``produce`` call: it writes
        into a slot that the queue no longer holds and publishes nothing. Called on a producer
        thread (from ``produce``), it only tells the producers to stop and returns False.
        """
        ring = self._ring
        if threading.current_thread() in self._threads:
            ring.abandon()  # this thread may hold the lock, and cannot join itself
            return False
        # A signal handler that calls close() while its thread is inside get() finds the lock held by that very
        # thread (it waited for itself for ever when the lock was not reentrant). It sets the flag (get() raises
        # at its next check) and returns: the producers cannot finish while this thread holds the lock, and
        # get() is still using the slots.
        inside_get = ring.lock._is_owned()  # (RLock's; threading.Condition relies on it too)
        with ring.lock:
            ring.closed = True
            ring.wake_all()
        if inside_get:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with ring.lock:
            # A pinned block whose non_blocking copy is still in flight is kept by the caching
            # host allocator until the copy is done, so dropping the slots here is safe. The error
            # goes too: its traceback holds the failed produce() frame, and so a slot.
            ring.slots, ring.copy_done, ring.error = [], [], None
        return self.alive_producers == 0

    def close_after_error(self) -> None:
        """Close on an error path: wait a bounded time (an interrupted consumer must not hang on a
        slow ``produce``), and say so if a producer is still running. Once: a later call (the queue's
        own iterator, then the ``with`` block around it) neither waits nor warns again."""
        if self._gave_up:
            self.close(timeout=0)
            return
        if not self.close():
            self._gave_up = True
            warnings.warn(f"PinnedRingQueue: {self.alive_producers} producer thread(s) still running "
                          f"{JOIN_SECONDS} s after close(); they stop once their produce call returns",
                          RuntimeWarning, stacklevel=3)

    @property
    def alive_producers(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> "PinnedRingQueue":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close(timeout=None)  # a normal exit leaves no producer behind
        else:
            self.close_after_error()
