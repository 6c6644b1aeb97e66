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

Errors and shutdown. An exception in ``produce`` is re-raised in the consumer (the original
exception object, traceback included, with a note naming the thread and batch) once the consumer
reaches the failed batch (all earlier batches are delivered first). ``close()`` (also on leaving a ``with`` block, on early stop
or KeyboardInterrupt) wakes and joins every producer; waits poll every 50 ms so this takes well
under a second unless a ``produce`` call itself is slow.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import torch

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
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            raise TypeError(f"spec[{name!r}] must be (shape, dtype), got {entry!r}") from None
        if not isinstance(dtype, torch.dtype) or any(n < 0 for n in shape):
            raise TypeError(f"spec[{name!r}] must be (shape of non-negative ints, torch.dtype), got {entry!r}")
        checked[name] = (shape, dtype)
    return checked


class PinnedRingQueue:
    """Bounded multi-producer, single-consumer queue of batches shaped by ``spec``.

    Args:
        spec: name -> (shape, dtype) of every tensor of a batch.
        produce: ``produce(seq, slot) -> bool`` writes batch ``seq`` into the CPU tensors of
            ``slot`` (a dict shaped by ``spec``); False means there is no batch ``seq``.
        num_producers: producer threads.
        num_slots: ring size (batches in flight).
        device: where the consumer wants the tensors.
        pin_memory: pin the slots (default: when CUDA is available).

    Use as an iterator of ``(seq, tensors)`` or call :meth:`get`; always :meth:`close` it (or use
    ``with``).
    """

    def __init__(self, spec, produce: Callable[[int, dict], bool], num_producers: int = 2, num_slots: int = 4,
                 device="cpu", pin_memory: bool | None = None):
        self.spec = _check_spec(spec)
        if not callable(produce):
            raise TypeError(f"produce must be callable, got {type(produce).__name__}")
        for name, value in (("num_producers", num_producers), ("num_slots", num_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        self.num_slots = num_slots
        self._produce = produce
        self._slots = [{name: torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
                        for name, (shape, dtype) in self.spec.items()} for _ in range(num_slots)]
        self._ready_seq = [-1] * num_slots  # which batch each slot holds, -1 when none
        self._copy_stream = None
        self._copy_done: list = [None] * num_slots
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
            self._copy_done = [torch.cuda.Event() for _ in range(num_slots)]
        self._condition = threading.Condition(threading.Lock())
        self._next_claim = 0
        self._next_deliver = 0
        self._end_seq: int | None = None
        self._error: tuple[BaseException, str, int] | None = None
        self._closed = False
        self.stats = QueueStats(num_slots)
        self._threads = [threading.Thread(target=self._producer_loop, name=f"PinnedRingQueue-producer-{i}",
                                          daemon=True) for i in range(num_producers)]
        for thread in self._threads:
            thread.start()

    # ---- producers ---------------------------------------------------------------------------

    def _stream_over(self, seq: int) -> bool:
        # Batches before a failed one are still produced, so the consumer gets all of them first.
        return (self._closed or (self._error is not None and seq > self._error[2])
                or (self._end_seq is not None and seq >= self._end_seq))

    def _producer_loop(self) -> None:
        while True:
            with self._condition:
                seq = self._next_claim
                if self._stream_over(seq):
                    return
                self._next_claim += 1
                waited_from = time.perf_counter()
                while not self._stream_over(seq) and seq >= self._next_deliver + self.num_slots:
                    self._condition.wait(POLL_SECONDS)
                self.stats.producer_wait_seconds += time.perf_counter() - waited_from
                if self._stream_over(seq):
                    return
            slot = seq % self.num_slots
            if self._copy_done[slot] is not None:
                self._copy_done[slot].synchronize()  # the previous batch's copy out of this slot
            started = time.perf_counter()
            try:
                produced = bool(self._produce(seq, self._slots[slot]))
            except BaseException as error:  # noqa: B902 - every failure must reach the consumer
                with self._condition:
                    if self._error is None:
                        error.add_note(f"raised in {threading.current_thread().name} while producing batch {seq}")
                        self._error = (error, threading.current_thread().name, seq)
                    self._condition.notify_all()
                return
            with self._condition:
                self.stats.produce_seconds += time.perf_counter() - started
                if produced:
                    self._ready_seq[slot] = seq
                    self.stats.produced += 1
                elif self._end_seq is None or seq < self._end_seq:
                    self._end_seq = seq
                self._condition.notify_all()

    # ---- consumer ----------------------------------------------------------------------------

    def get(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The next batch as ``(seq, tensors on device)``, or None at the end of the stream.
        Raises a producer's exception if the next batch will never come."""
        with self._condition:
            if self._closed and self._error is None:
                raise RuntimeError("PinnedRingQueue.get() after close()")
            seq = self._next_deliver
            slot = seq % self.num_slots
            waited_from = time.perf_counter()
            while self._ready_seq[slot] != seq:
                if self._end_seq is not None and seq >= self._end_seq:
                    return None
                if self._error is not None and seq >= self._error[2]:
                    self._closed = True
                    self._condition.notify_all()
                    raise self._error[0]
                if self._closed:
                    raise RuntimeError("PinnedRingQueue.get() after close()")
                self._condition.wait(POLL_SECONDS)
            self.stats.consumer_wait_seconds += time.perf_counter() - waited_from
            occupancy = sum(1 for s in self._ready_seq if s >= seq)
            self.stats.occupancy_sum += occupancy
            self.stats.occupancy_max = max(self.stats.occupancy_max, occupancy)
        tensors = self._copy_out(slot)
        with self._condition:
            self._ready_seq[slot] = -1
            self._next_deliver += 1
            self.stats.delivered += 1
            self._condition.notify_all()
        return seq, tensors

    def _copy_out(self, slot: int) -> dict[str, torch.Tensor]:
        host = self._slots[slot]
        if self._copy_stream is None:
            return {name: tensor.to(self.device, copy=True) for name, tensor in host.items()}
        consumer_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            # Allocated on the side stream; record_stream below keeps the allocator from reusing
            # them until the consumer stream's work on them is done.
            tensors = {name: tensor.to(self.device, non_blocking=True) for name, tensor in host.items()}
            self._copy_done[slot].record(self._copy_stream)
        consumer_stream.wait_event(self._copy_done[slot])
        for tensor in tensors.values():
            tensor.record_stream(consumer_stream)
        return tensors

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self) -> bool:
        """Stop and join every producer (within about a second). Returns True if all joined."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def alive_producers(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> "PinnedRingQueue":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
