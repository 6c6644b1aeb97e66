"""Several Python threads at once: the streaming recommender shared by threads, weights written by another thread
while a call packs them, and another thread's torch.compile session (from a report-only audit of thread safety)."""

import copy
import threading
import time

import pytest
import torch

from hiertcn_fast import nn as hnn
from hiertcn_fast import ops
from hiertcn_fast.models import HierTCN
from hiertcn_fast.ops import CausalConvState
from hiertcn_fast.ops import conv as conv_ops
from hiertcn_fast.serve import StreamingRecommender
from model_helpers import one_thread  # noqa: F401 (autouse fixture)

NUM_ITEMS = 23


def small_hiertcn():
    torch.manual_seed(5)
    return HierTCN(NUM_ITEMS, embedding_dim=12, state_layers=2, state_hidden=7, tcn_channels=(9, 11), kernel_size=3,
                   dilations=(1, 2), max_session_length=6).double().eval()


def _run_in_thread(target, wait: float):
    """Start target in a thread and wait for it at most ``wait`` seconds; the thread and what it raised."""
    raised = []

    def run():
        try:
            target()
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    return thread, raised


@pytest.mark.parametrize("path", ["observe_many", "observe"])
def test_a_shared_recommender_runs_one_call_at_a_time(path):
    """Thread B's call lands while thread A's is inside the model's TCN step (A's user copied into the scratch
    state every call of its row count shares): B must wait for A's call to end. Without the recommender's lock,
    B's user was left in the scratch and stepped with A's input into A's row: both users' scores came out wrong,
    with no error."""
    model = small_hiertcn()
    expected = StreamingRecommender(model, initial_capacity=16)
    for user, item in (("ann", 5), ("ann", 6), ("bob", 9)):
        expected.observe(user, item, 1000.0)
    shared = StreamingRecommender(model, initial_capacity=16)
    shared.observe("ann", 5, 1000.0)
    real_step = type(model.tcn).step
    landed, thread_a = [], threading.current_thread()

    def step_with_another_thread(self, x, state, context=None):
        if not landed and x.shape[0] == 1 and threading.current_thread() is thread_a:
            # Thread B: a new user's first event, while this call is between copying its user in and stepping.
            landed.append(_run_in_thread(lambda: shared.observe("bob", 9, 1000.0), wait=1.0))
        return real_step(self, x, state, context)

    model.tcn.step = step_with_another_thread.__get__(model.tcn)
    try:
        if path == "observe":
            shared.observe("ann", 6, 1000.0)
        else:
            shared.observe_many(["ann"], [6], [1000.0])
    finally:
        del model.tcn.step
    assert len(landed) == 1
    thread, raised = landed[0]
    assert thread.is_alive(), "thread B's call ran while thread A's was inside the model: no lock held it back"
    thread.join(30)
    assert not thread.is_alive() and not raised
    for user in ("ann", "bob"):
        torch.testing.assert_close(shared.scores(user), expected.scores(user), rtol=0, atol=1e-12)


def test_a_shared_recommender_survives_threads_registering_users():
    """Four threads each register and feed users of their own on one recommender (which grows from 1 row): every
    user ends with the scores of a recommender fed the same events from one thread."""
    model = small_hiertcn()
    events = {f"u{t}_{i}": [(1 + (7 * t + 3 * i + j) % NUM_ITEMS, 1000.0 + 60 * j) for j in range(4)]
              for t in range(4) for i in range(6)}
    alone = StreamingRecommender(model, initial_capacity=1)
    for user, stream in events.items():
        for item, time in stream:
            alone.observe(user, item, time)
    shared = StreamingRecommender(model, initial_capacity=1)
    start = threading.Barrier(4)
    errors = []

    def feed(t):
        try:
            start.wait(30)
            mine = [user for user in events if user.startswith(f"u{t}_")]
            for j in range(4):
                for k, user in enumerate(mine):
                    item, time = events[user][j]
                    if k % 2:
                        shared.observe_many([user], [item], [time])
                    else:
                        shared.observe(user, item, time)
                    shared.recommend(user, 3)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=feed, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert set(shared.user_slot) == set(events)
    for user in events:
        torch.testing.assert_close(shared.scores(user), alone.scores(user), rtol=0, atol=1e-12)


def test_a_copy_of_a_shared_recommender_waits_for_the_call_in_flight():
    """copy.deepcopy (and pickle) read the recommender under its lock: a copy made while another thread's call
    is inside the model waits for it, and is the recommender after that call."""
    model = small_hiertcn()
    shared = StreamingRecommender(model, initial_capacity=4)
    shared.observe("ann", 5, 1000.0)
    real_step = type(model.tcn).step
    started, copies = [], []

    def step_with_a_copy(self, x, state, context=None):
        if not started:
            started.append(_run_in_thread(lambda: copies.append(copy.deepcopy(shared)), wait=1.0))
        return real_step(self, x, state, context)

    model.tcn.step = step_with_a_copy.__get__(model.tcn)
    try:
        shared.observe("ann", 6, 1000.0)
    finally:
        del model.tcn.step
    thread, raised = started[0]
    assert thread.is_alive(), "the copy was made in the middle of another thread's call"
    thread.join(30)
    assert not raised and len(copies) == 1
    torch.testing.assert_close(copies[0].scores("ann"), shared.scores("ann"), rtol=0, atol=0)


# ---- A weight written by another thread while a call packs it -------------------------------------------------
# The write is made at the exact point another thread's would land (inside the call, just after the package read
# the weight), from this thread, so that each case is deterministic. The call in flight may use either value;
# every later call must use the new one. A cache stamped with the weight's version after reading it kept the old
# packing under the new version, for good.


def _later_steps_match_a_fresh_copy(tcn, state, xs, context=None):
    fresh_tcn, fresh_state = copy.deepcopy(tcn), copy.deepcopy(state)  # copies carry no caches
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(tcn.step(x, state, context), fresh_tcn.step(x, fresh_state, context),
                                       rtol=0, atol=1e-12)


def _written_once_after(monkeypatch, name, tensor):
    """ops.conv's function ``name`` made to write ``tensor`` in place once, just after its first call read it;
    the list the write is recorded in."""
    real, written = getattr(conv_ops, name), []

    def then_written(*args):
        value = real(*args)
        if not written:
            written.append(tensor.add_(1.0))
        return value

    monkeypatch.setattr(conv_ops, name, then_written)
    return written


def test_a_state_packs_again_after_a_write_that_landed_while_it_packed(monkeypatch):
    torch.manual_seed(0)
    weight, x = torch.randn(16, 8, 3, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    state = CausalConvState.zeros(2, 8, 3, 1, dtype=torch.float64)
    written = _written_once_after(monkeypatch, "pack_weight", weight)
    with torch.no_grad():
        ops.causal_conv1d_step(x, weight, state, backend="cpu")
    monkeypatch.undo()
    assert written
    fresh = CausalConvState(state.history.clone(), state.position.clone(), 3, 1)
    with torch.no_grad():
        later = ops.causal_conv1d_step(x, weight, state, backend="cpu")
        expected = ops.causal_conv1d_step(x, weight.clone(), fresh, backend="cpu")
    torch.testing.assert_close(later, expected, rtol=0, atol=1e-12)


def test_a_context_table_is_made_again_after_a_write_that_landed_while_it_was_made(monkeypatch):
    torch.manual_seed(0)
    weight, x = torch.randn(16, 8, 3, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    context, context_weight = torch.randn(2, 4, dtype=torch.float64), torch.randn(16, 4, 3, dtype=torch.float64)
    state = CausalConvState.zeros(2, 8, 3, 1, dtype=torch.float64)
    written = _written_once_after(monkeypatch, "context_table", context_weight)
    with torch.no_grad():
        ops.causal_conv1d_step(x, weight, state, context=context, context_weight=context_weight, backend="cpu")
    monkeypatch.undo()
    assert written
    fresh = CausalConvState(state.history.clone(), state.position.clone(), 3, 1)
    with torch.no_grad():
        later = ops.causal_conv1d_step(x, weight, state, context=context, context_weight=context_weight,
                                       backend="cpu")
        expected = ops.causal_conv1d_step(x, weight, fresh, context=context, context_weight=context_weight.clone(),
                                          backend="cpu")
    torch.testing.assert_close(later, expected, rtol=0, atol=1e-12)


def test_a_prepared_tcn_step_is_not_kept_after_a_write_that_landed_while_it_was_made(monkeypatch):
    """The write lands between the packing of the stack's weights and the prepared plan's constructor, which reads
    the versions it compares at every later step."""
    torch.manual_seed(0)
    tcn = hnn.TCN(8, [16, 16], kernel_size=3).double().eval()
    state = tcn.init_state(1)
    xs = [torch.randn(1, 8, dtype=torch.float64) for _ in range(6)]
    extension = conv_ops._extension.module()
    written = []

    class Extension:
        def __getattr__(self, name):
            return getattr(extension, name)

        @staticmethod
        def TcnStepPlan(*args):  # noqa: N802 (the extension's class)
            if not written:
                with torch.no_grad():
                    written.append(tcn.blocks[1].conv.weight.add_(0.5))
            return extension.TcnStepPlan(*args)

    monkeypatch.setattr(conv_ops._extension, "module", lambda: Extension())
    with torch.no_grad():
        for x in xs[:3]:  # the second step prepares the plan (the write lands then), the third would run it
            tcn.step(x, state)
    monkeypatch.undo()
    assert written
    _later_steps_match_a_fresh_copy(tcn, state, xs[3:])


def test_the_step_shortcut_is_not_kept_after_a_context_write_that_landed_while_it_was_made(monkeypatch):
    """The write of the context weight lands after the shortcut's context table was read and before the shortcut
    took the weight's version."""
    torch.manual_seed(0)
    tcn = hnn.TCN(8, [16, 16], kernel_size=3, context_channels=4).double().eval()
    state = tcn.init_state(1)
    context = torch.randn(1, 4, dtype=torch.float64)
    xs = [torch.randn(1, 8, dtype=torch.float64) for _ in range(6)]
    real_inputs, written = hnn.conv.context_inputs, []

    def inputs_then_written(*args):
        inputs = real_inputs(*args)
        if not written:
            with torch.no_grad():
                written.append(tcn.blocks[0].conv.context_weight.add_(0.5))
        return inputs

    monkeypatch.setattr(hnn.conv, "context_inputs", inputs_then_written)
    with torch.no_grad():
        for x in xs[:3]:
            tcn.step(x, state, context)
    monkeypatch.undo()
    assert written
    _later_steps_match_a_fresh_copy(tcn, state, xs[3:], context)


def test_the_step_shortcut_is_not_kept_after_caches_forgotten_while_it_was_made(monkeypatch):
    """A change through .data (which moves no version) followed by forget_weight_caches(), the documented way,
    lands after the step found its prepared plan valid and before the shortcut read the cache generation."""
    torch.manual_seed(0)
    tcn = hnn.TCN(8, [16, 16], kernel_size=3).double().eval()
    state = tcn.init_state(1)
    xs = [torch.randn(1, 8, dtype=torch.float64) for _ in range(6)]
    real_entry, written = hnn.conv.prepared_entry, []

    def entry_then_forgotten(*args):
        entry = real_entry(*args)
        if entry is not None and not written:
            tcn.blocks[1].conv.weight.data.add_(0.5)
            ops.forget_weight_caches()
            written.append(True)
        return entry

    monkeypatch.setattr(hnn.conv, "prepared_entry", entry_then_forgotten)
    with torch.no_grad():
        for x in xs[:3]:
            tcn.step(x, state)
    monkeypatch.undo()
    assert written
    _later_steps_match_a_fresh_copy(tcn, state, xs[3:])


# ---- Another thread's torch.compile session ------------------------------------------------------------------
# torch.compiler.is_compiling() reads one flag for the process, which Dynamo holds for a whole compile session:
# here it is made to read True as it does while another thread compiles. This thread, eager, must keep its
# refusals and its caches.


def _another_thread_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_a_double_backward_is_refused_while_another_thread_compiles(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    _another_thread_compiling(monkeypatch)
    out = ops.causal_conv1d(x, weight, activation="tanh", backend="cpu")
    with pytest.raises(RuntimeError, match="create_graph=True would give higher derivatives"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)


def test_a_batched_gradient_is_refused_while_another_thread_compiles(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 2, dtype=torch.float64)
    _another_thread_compiling(monkeypatch)
    out = ops.causal_conv1d(x, weight, backend="cpu")
    with pytest.raises(RuntimeError, match="take no batched gradient"):
        torch.autograd.grad(out, x, torch.randn(3, *out.shape, dtype=torch.float64), is_grads_batched=True)


def test_the_step_keeps_its_caches_while_another_thread_compiles(monkeypatch):
    """TCN.step's shortcut and a state's packed weight are used as outside a compile session (traced, both would be
    made again at every call)."""
    torch.manual_seed(0)
    tcn = hnn.TCN(8, [16, 16], kernel_size=3).double().eval()
    state = tcn.init_state(1)
    xs = [torch.randn(1, 8, dtype=torch.float64) for _ in range(4)]
    _another_thread_compiling(monkeypatch)
    with torch.no_grad():
        for x in xs[:2]:
            tcn.step(x, state)
    assert state._fast is not None, "no shortcut made: the step took this thread for a traced one"
    weight, x = torch.randn(16, 8, 3, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    conv_state = CausalConvState.zeros(2, 8, 3, 1, dtype=torch.float64)
    with torch.no_grad():
        ops.causal_conv1d_step(x, weight, conv_state, backend="cpu")
        packed = conv_state._packed
        ops.causal_conv1d_step(x, weight, conv_state, backend="cpu")
    assert packed is not None and conv_state._packed is packed


# ---- The GIL during a prepared step --------------------------------------------------------------------------


def _first_run_of_another_thread(step):
    """(start, when another Python thread first ran, end) around step(): the thread is woken just before step() is
    called. Were the GIL held through the kernel, it could first run only once step() had returned."""
    woken, first_ran = threading.Event(), []

    def other():
        woken.wait(30)
        first_ran.append(time.perf_counter())

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.05)  # the thread is waiting on the event
    start = time.perf_counter()
    woken.set()
    step()
    end = time.perf_counter()
    thread.join(30)
    return start, first_ran[0], end


@pytest.mark.parametrize("path", ["TCN.step", "ops.tcn_step"])
def test_other_threads_run_while_a_prepared_step_runs_its_kernel(path):
    """A server's other threads (its I/O, other requests) run while a large prepared step computes: the step
    releases the GIL around its kernel, as torch's ops do. Held, they were stalled for the whole step."""
    torch.manual_seed(0)
    tcn = hnn.TCN(512, [512] * 8, kernel_size=3, dilations=[1] * 8).eval()  # about 0.1 s a step on one core
    batch = 4096
    state = tcn.init_state(batch)
    x = torch.randn(batch, 512)
    blocks = list(tcn.blocks)
    weights = [block.conv.weight for block in blocks]
    biases = [block.conv.bias for block in blocks]
    if path == "TCN.step":
        def step():
            return tcn.step(x, state)
    else:
        layers = state.layers

        def step():
            return ops.tcn_step(x, weights, biases, layers, backend="cpu")
    with torch.no_grad():
        for _ in range(3):  # the second call prepares the step, the third runs it
            step()
        if path == "TCN.step":
            assert state._fast is not None
        start, first_ran, end = _first_run_of_another_thread(step)
    assert end - start > 0.05, "the step is too short to tell"
    assert first_ran < start + (end - start) / 2, (
        f"the other thread first ran {first_ran - start:.3f} s into a {end - start:.3f} s step")
