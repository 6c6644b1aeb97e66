"""Fuzzing the cross-cutting machinery: backend selection (keyword > use_backend block > HIERTCN_BACKEND > auto) for
every public op and nn module, threads and asyncio tasks, refusals of backends that cannot run, torch.compile
(fullgraph, dynamic shapes, recompiles, gradients) of the ops and modules, torch.func and forward-mode AD, opcheck
of the registered ops not checked elsewhere, and CPU autocast of the modules.

The tests whose comments say what was wrong pin defects found this way (each failed before its fix)."""

import asyncio
import os
import sys
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._dynamo.testing import CompileCounterWithBackend

import hiertcn_fast
from hiertcn_fast import BackendUnavailableError, ops, use_backend
from hiertcn_fast.backends import ENV_VAR, requested_backend, resolve, triton_interpreted
from hiertcn_fast.nn import GRU, TCN, CausalConv1d, GRUCell, TemporalBlock
from hiertcn_fast.ops import CausalConvState
from hiertcn_fast.ops.conv import CAUSAL_CONV1D_DTYPES, CAUSAL_CONV_DTYPES
from hiertcn_fast.ops.gru import GRU_DTYPES

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
NAMES = ("cuda", "triton", "cpu", "reference", "auto")


@pytest.fixture(autouse=True)
def _no_backend_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ---- one call of every public op -------------------------------------------------------------------------------

def _op_calls(dtype=torch.float32, seed=0):
    """name -> (call(backend) -> output tensor, reference() -> the same computed by the op's reference)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    B, T, C, H = 2, 5, 3, 4
    x, w, b = r(B, T, C), r(4, C, 3), r(4)
    ctx, ctx_w = r(B, 2), r(4, 2, 3)
    gi, gh, h = r(B, 3 * H), r(B, 3 * H), r(B, H)
    wih, whh, bih, bhh = r(3 * H, C), r(3 * H, H), r(3 * H), r(3 * H)
    layer = [(wih, whh, bih, bhh)]
    items, lengths, hh, keep = r(B, T, C), torch.tensor([3, 0]), r(1, B, H), torch.tensor([True, False])
    feat, lw, lb, tg = r(6, C), r(7, C), r(7), torch.randint(0, 7, (6,), generator=g)
    stack_w = [r(C, C, 2), r(4, C, 2)]
    stack_b = [r(C), None]
    proj = [None, r(4, C)]

    def conv_step(be):
        state = CausalConvState.zeros(B, C, 3, 2, dtype=dtype)
        outs = [ops.causal_conv1d_step(x[:, t], w, state, b, context=ctx, context_weight=ctx_w, activation="relu",
                                       backend=be) for t in range(T)]
        return torch.stack(outs, 1)

    def stack_step(be):
        states = [CausalConvState.zeros(B, C, 2, d, dtype=dtype) for d in (1, 2)]
        outs = [ops.tcn_step(x[:, t], stack_w, stack_b, states, proj_weights=proj, backend=be) for t in range(T)]
        return torch.stack(outs, 1)

    return {
        "causal_conv1d": (lambda be: ops.causal_conv1d(x, w, b, dilation=2, context=ctx, context_weight=ctx_w,
                                                       activation="relu", backend=be),
                          lambda: ops.causal_conv1d_reference(x, w, b, dilation=2, context=ctx, context_weight=ctx_w,
                                                              activation="relu")),
        "causal_conv1d_step": (conv_step, lambda: ops.causal_conv1d_reference(
            x, w, b, dilation=2, context=ctx, context_weight=ctx_w, activation="relu")),
        "tcn_step": (stack_step, lambda: stack_step("reference")),
        "gru_gates": (lambda be: ops.gru_gates(gi, gh, h, backend=be), lambda: ops.gru_gates_reference(gi, gh, h)),
        "gru_cell": (lambda be: ops.gru_cell(x[:, 0], h, wih, whh, bih, bhh, backend=be),
                     lambda: ops.gru_cell_reference(x[:, 0], h, wih, whh, bih, bhh)),
        "gru": (lambda be: ops.gru(x, None, layer, num_layers=1, backend=be)[0],
                lambda: ops.gru_reference(x, None, layer, num_layers=1)[0]),
        "session_update": (lambda be: ops.session_update(items, lengths, hh, keep, layer, backend=be),
                           lambda: ops.session_update_reference(items, lengths, hh, keep, layer)),
        "session_update_steps": (
            lambda be: ops.session_update_steps(items[None], lengths[None], hh, keep[None], layer, backend=be),
            lambda: ops.session_update_steps_reference(items[None], lengths[None], hh, keep[None], layer)),
        "linear_cross_entropy": (lambda be: ops.linear_cross_entropy(feat, lw, lb, tg, backend=be),
                                 lambda: ops.linear_cross_entropy_reference(feat, lw, lb, tg)),
    }


OPS = list(_op_calls())


def _outcome(call):
    try:
        call()
        return "ran"
    except BackendUnavailableError:
        return "refused"


@pytest.mark.parametrize("op", OPS)
def test_every_op_follows_keyword_then_block_then_environment_then_auto(monkeypatch, op):
    """'cuda' cannot run on CPU tensors: where it is the selection the op must refuse, wherever it is overridden the
    op must run (and give the reference's result)."""
    call, reference = _op_calls()[op]
    expected = reference()
    torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)  # auto
    assert _outcome(lambda: call("cuda")) == "refused"
    with use_backend("cuda"):
        assert _outcome(lambda: call(None)) == "refused"
        torch.testing.assert_close(call("reference"), expected, rtol=1e-5, atol=1e-5)  # keyword beats the block
        with use_backend("reference"):  # the innermost block wins
            torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)
        assert _outcome(lambda: call(None)) == "refused"  # the outer block is back
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert _outcome(lambda: call(None)) == "refused"
    with use_backend("reference"):  # a block beats the environment
        torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)
    with use_backend("auto"):  # an explicit auto block too
        torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call("cpu"), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match=r"HIERTCN_BACKEND.*'cuda', 'triton', 'cpu', 'reference', 'auto'"):
        call(None)
    with use_backend("reference"):  # the environment is not consulted under a block
        torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(ENV_VAR, "")  # empty: auto
    torch.testing.assert_close(call(None), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_unrunnable_backends_are_refused_with_a_fix(monkeypatch, op):
    call, _ = _op_calls()[op]
    with pytest.raises(BackendUnavailableError) as refusal:
        call("cuda")
    message = str(refusal.value)
    assert "cuda" in message and ("CUDA tensors" in message or "fix" in message or "has no" in message), message
    # triton without TRITON_INTERPRET (and without a GPU): refused, naming TRITON_INTERPRET (or that the op has none)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not triton_interpreted()
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET|no triton backend"):
            call("triton")


def test_bad_names_are_refused_at_once_listing_the_valid_ones():
    listing = r"\('cuda', 'triton', 'cpu', 'reference', 'auto'\)"
    for bad in ("gpu", "CPU", "", None, 0):
        with pytest.raises(ValueError, match=listing):
            with use_backend(bad):
                pass
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    for bad in ("gpu", "Reference", ""):
        with pytest.raises(ValueError, match=listing):
            ops.gru_gates(gi, gh, h, backend=bad)
    for make in (lambda: CausalConv1d(2, 3, 2, backend="gpu"), lambda: TemporalBlock(2, 3, backend="gpu"),
                 lambda: TCN(2, [3], backend="gpu"), lambda: GRU(2, 3, backend="gpu"),
                 lambda: GRUCell(2, 3, backend="gpu")):
        with pytest.raises(ValueError, match=listing):  # at construction, not at the first forward
            make()
    assert requested_backend() == "auto"  # nothing left selected by the refused blocks


def _modules():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    return [
        ("CausalConv1d", CausalConv1d(3, 4, 3, dilation=2, activation="relu"), lambda m: m(x),
         lambda m: m.step(x[:, 0], m.init_state(2))),
        ("TemporalBlock", TemporalBlock(3, 4, 2), lambda m: m(x), lambda m: m.step(x[:, 0], m.init_state(2))),
        ("TCN", TCN(3, [4, 4], 2, context_channels=2), lambda m: m(x, torch.ones(2, 2)),
         lambda m: m.step(x[:, 0], m.init_state(2), torch.ones(2, 2))),
        ("GRU", GRU(3, 4, num_layers=2, batch_first=True), lambda m: m(x)[0], lambda m: m.step(x[:, 0])[0]),
        ("GRUCell", GRUCell(3, 4), lambda m: m(x[:, 0]), lambda m: m(x[:, 1])),
    ]


@pytest.mark.parametrize("index", range(5), ids=[name for name, *_ in _modules()])
def test_every_module_follows_the_selection_and_its_own_backend(monkeypatch, index):
    name, module, forward, step = _modules()[index]
    module.eval()
    with torch.no_grad():
        expected = forward(module)
        with use_backend("reference"):
            torch.testing.assert_close(forward(module), expected, rtol=1e-5, atol=1e-5)
        for run in (forward, step):
            with use_backend("cuda"):
                assert _outcome(lambda: run(module)) == "refused", name
            monkeypatch.setenv(ENV_VAR, "cuda")
            assert _outcome(lambda: run(module)) == "refused", name
            monkeypatch.delenv(ENV_VAR)
        for sub in module.modules():  # the module's own backend beats a block and the environment
            if hasattr(sub, "backend"):
                sub.backend = "reference"
        monkeypatch.setenv(ENV_VAR, "cuda")
        with use_backend("cuda"):
            torch.testing.assert_close(forward(module), expected, rtol=1e-5, atol=1e-5)
            step(module)


def test_tcn_step_shortcut_rechecks_the_selection_after_it_was_prepared(monkeypatch):
    """TCN.step's prepared shortcut must still see a block, the environment and module attributes changed later."""
    torch.manual_seed(1)
    tcn = TCN(3, [4, 4], 2, context_channels=2).eval()
    x, context = torch.randn(2, 9, 3), torch.randn(2, 2)
    plain = tcn.init_state(2)
    with torch.no_grad():
        state = tcn.init_state(2)
        for t in range(3):
            tcn.step(x[:, t], state, context)
            tcn.step(x[:, t], plain, context)
        assert state._fast is not None
        with use_backend("cuda"), pytest.raises(BackendUnavailableError):
            tcn.step(x[:, 3], state, context)
        monkeypatch.setenv(ENV_VAR, "cuda")
        with pytest.raises(BackendUnavailableError):
            tcn.step(x[:, 3], state, context)
        monkeypatch.setenv(ENV_VAR, "reference")
        torch.testing.assert_close(tcn.step(x[:, 3], state, context), tcn.step(x[:, 3], plain, context))
        monkeypatch.delenv(ENV_VAR)
        for t in range(4, 6):
            torch.testing.assert_close(tcn.step(x[:, t], state, context), tcn.step(x[:, t], plain, context))
        for block in tcn.blocks:
            block.conv.backend = "cuda"
        with pytest.raises(BackendUnavailableError):
            tcn.step(x[:, 6], state, context)


# TCN.forward runs each block on its own conv's backend; TCN.step ran the whole stack on the first block's: a TCN
# whose second block asks for "cuda" was refused by forward but stepped (on cpu) by step.
def test_tcn_step_honours_each_blocks_backend_as_forward_does():
    torch.manual_seed(1)
    tcn = TCN(3, [4, 4], 2).eval()
    tcn.blocks[1].conv.backend = "cuda"
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        with pytest.raises(BackendUnavailableError):
            tcn(x)
        state = tcn.init_state(2)
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run this call"):
            tcn.step(x[:, 0], state)
        assert all(not layer.position.any() for layer in state.layers)  # refused before any layer stepped
        # Blocks on different backends that can run: each on its own, stepping equals forward.
        tcn.blocks[1].conv.backend = "reference"
        full = tcn(x)
        assert torch.allclose(torch.stack([tcn.step(x[:, t], state) for t in range(5)], 1), full, atol=1e-6)


def test_threads_and_tasks_keep_their_own_selection():
    """use_backend is a ContextVar: a block in one thread (or asyncio task) is not seen by another running at the
    same time, and no block leaks out after it ends."""
    barrier = threading.Barrier(2)
    seen = {}

    def worker(name):
        with use_backend(name):
            barrier.wait()  # both threads inside their blocks at once
            seen[name] = requested_backend()
            gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
            seen[name + " op"] = _outcome(lambda: ops.gru_gates(gi, gh, h))
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "cuda")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "reference op": "ran", "cuda": "cuda", "cuda op": "refused"}
    assert requested_backend() == "auto"

    async def task(name):
        with use_backend(name):
            await asyncio.sleep(0.01)
            return requested_backend()

    async def main():
        return await asyncio.gather(task("reference"), task("cpu"), task("cuda"))

    assert asyncio.run(main()) == ["reference", "cpu", "cuda"]
    assert requested_backend() == "auto"
    # Nor does the module-level copy that traces read before torch 2.14: the blocks of the tasks and threads, left
    # out of order, each put back the selection it had found, and one outlived them all.
    assert sys.modules["hiertcn_fast.backends"]._selected_for_tracing is None
    # A thread started inside a block runs with a fresh context (threading does not copy contextvars).
    result = {}
    with use_backend("reference"):
        thread = threading.Thread(target=lambda: result.setdefault("inside", requested_backend()))
        thread.start()
        thread.join()
    assert result["inside"] == "auto"


TABLES = {"causal_conv1d": CAUSAL_CONV1D_DTYPES, "causal_conv1d_step": CAUSAL_CONV_DTYPES,
          "tcn_step": CAUSAL_CONV_DTYPES, "gru_gates": GRU_DTYPES, "gru_cell": GRU_DTYPES, "gru": GRU_DTYPES,
          "session_update": GRU_DTYPES, "session_update_steps": GRU_DTYPES}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_auto_on_cpu_picks_cpu_where_it_can_and_the_reference_elsewhere(dtype):
    expected = "cpu" if dtype in (torch.float32, torch.float64) else "reference"
    for op, table in TABLES.items():
        assert resolve(op, None, torch.device("cpu"), dtype, table) == expected, op
    if expected == "reference":
        for op, table in TABLES.items():
            with pytest.raises(BackendUnavailableError, match=f"does not support {dtype}"):
                resolve(op, "cpu", torch.device("cpu"), dtype, table)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0, torch.float16: 0}[dtype]
    for op, (call, reference) in _op_calls(dtype, seed=3).items():
        got, want = call(None), reference()
        assert got.dtype == want.dtype, op
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=op)


# ---- torch.compile ---------------------------------------------------------------------------------------------

def _grad_inputs(args):
    return [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]


def _compile_case(op):
    H = 4

    def conv(x, w, b, c, cw, r, be):
        return ops.causal_conv1d(x, w, b, dilation=2, context=c, context_weight=cw, activation="tanh", residual=r,
                                 backend=be)

    def gates(gi, gh, h, be):
        return ops.gru_gates(gi, gh, h, backend=be)

    def cell(x, h, a, b, c, d, be):
        return ops.gru_cell(x, h, a, b, c, d, backend=be)

    def gru(x, h, a, b, c, d, be):
        out, h_n = ops.gru(x, h, [(a, b, c, d)], num_layers=1, backend=be)
        return torch.cat([out.flatten(), h_n.flatten()])

    def su(items, lengths, h, keep, a, b, c, d, be):
        return ops.session_update(items, lengths, h, keep, [(a, b, c, d)], backend=be)

    def sus(items, lengths, h, keep, a, b, c, d, be):
        return ops.session_update_steps(items, lengths, h, keep, [(a, b, c, d)], backend=be)

    def lce(f, w, b, t, be):
        return ops.linear_cross_entropy(f, w, b, t, backend=be)

    def weights(g):
        return (torch.randn(3 * H, 3, generator=g), torch.randn(3 * H, H, generator=g),
                torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g))

    def make(s):
        g = torch.Generator().manual_seed(s[0] * 100 + s[1])
        n = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        b, t = s
        return {
            "causal_conv1d": (conv, (n(b, t, 3), n(4, 3, 3), n(4), n(b, 2), n(4, 2, 3), n(b, t, 4))),
            "gru_gates": (gates, (n(b, 3 * H), n(b, 3 * H), n(b, H))),
            "gru_cell": (cell, (n(b, 3), n(b, H), *weights(g))),
            "gru": (gru, (n(b, t, 3), n(1, b, H), *weights(g))),
            "session_update": (su, (n(b, t, 3), torch.randint(0, t + 1, (b,), generator=g), n(1, b, H),
                                    torch.rand(b, generator=g), *weights(g))),
            "session_update_steps": (sus, (n(2, b, t, 3), torch.randint(0, t + 1, (2, b), generator=g), n(1, b, H),
                                           torch.rand(2, b, generator=g), *weights(g))),
            "linear_cross_entropy": (lce, (n(3 * b, 3), n(7, 3), n(7), torch.randint(0, 7, (3 * b,), generator=g))),
        }[op]
    return make


COMPILED_OPS = ["causal_conv1d", "gru_gates", "gru_cell", "gru", "session_update", "session_update_steps",
                "linear_cross_entropy"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", COMPILED_OPS)
def test_compiled_ops_match_eager_with_gradients_over_several_sizes(op, backend):
    """fullgraph compile (aot_eager: AOTAutograd's fake-tensor tracing of forward and backward) at three sizes:
    the eager outputs and gradients, and after the first size one dynamic graph (two frames in all). The gru's
    reference unrolls its time loop in Python, so it specialises on the time length."""
    make = _compile_case(op)
    torch._dynamo.reset()
    if op == "linear_cross_entropy" and backend == "cpu":
        # Documented: the cpu loss does not run under torch.compile, and a named backend is refused in words
        # (which dynamo wraps in its own error).
        fn, args = make((2, 5))
        with pytest.raises(Exception, match="linear_cross_entropy: backend 'cpu' cannot run this call: it does not "
                                            "run under torch.compile"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(*_grad_inputs(args), backend)
        return
    counter = CompileCounterWithBackend("aot_eager")
    fn = make((2, 5))[0]
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    sizes = [(2, 5), (3, 7), (4, 9)]
    for size in sizes:
        _, args = make(size)
        a, b = _grad_inputs(args), _grad_inputs(args)
        got, want = compiled(*a, backend), fn(*b, backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grad_out = torch.randn_like(got)
        leaves_a = [t for t in a if t.requires_grad]
        leaves_b = [t for t in b if t.requires_grad]
        got_grads = torch.autograd.grad(got, leaves_a, grad_out, allow_unused=True)
        want_grads = torch.autograd.grad(want, leaves_b, grad_out, allow_unused=True)
        for i, (g1, g2) in enumerate(zip(got_grads, want_grads)):
            assert (g1 is None) == (g2 is None), (op, i)
            if g1 is not None:
                torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5, msg=f"{op} grad {i} at {size}")
    limit = len(sizes) if (op == "gru" and backend == "reference") else 2
    assert counter.frame_count <= limit, f"{op} on {backend}: {counter.frame_count} compiles for {len(sizes)} sizes"


def _kernel_recorder():
    ran = []

    def capture(graph_module, example_inputs):
        kernel = "hiertcn_fast.gru_gates_out" in graph_module.code

        def run(*args):
            ran.append(kernel)
            return graph_module.forward(*args)
        return run
    return ran, capture


def test_compiled_op_recompiles_for_a_use_backend_block():
    ran, capture = _kernel_recorder()
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    expected = ops.gru_gates_reference(gi, gh, h)
    ops.gru_gates(gi, gh, h)  # the resolve cache warm, as in any process that ran the op before compiling
    torch._dynamo.reset()
    compiled = torch.compile(lambda gi, gh, h: ops.gru_gates(gi, gh, h), backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(gi, gh, h), expected)
    with use_backend("reference"):
        torch.testing.assert_close(compiled(gi, gh, h), expected)
    with use_backend("cuda"), pytest.raises(Exception, match="backend 'cuda' cannot run this call"):
        compiled(gi, gh, h)  # (dynamo wraps the error)
    torch.testing.assert_close(compiled(gi, gh, h), expected)
    assert ran == [True, False, True]


# A compiled graph chooses its backend when traced; dynamo guards no environment variable, so HIERTCN_BACKEND is
# read at tracing only (documented: set it before compiling, or reset dynamo after changing it).
def test_compiled_op_follows_the_environment_variable_set_before_compiling(monkeypatch):
    ran, capture = _kernel_recorder()
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    expected = ops.gru_gates_reference(gi, gh, h)
    ops.gru_gates(gi, gh, h)  # the resolve cache warm
    torch._dynamo.reset()
    compiled = torch.compile(lambda gi, gh, h: ops.gru_gates(gi, gh, h), backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(gi, gh, h), expected)
    assert ran[-1] is True
    monkeypatch.setenv(ENV_VAR, "cuda")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend 'cuda' cannot run this call"):  # (dynamo wraps the error)
        compiled(gi, gh, h)
    monkeypatch.setenv(ENV_VAR, "reference")
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(gi, gh, h), expected)
    assert ran[-1] is False, f"the compiled graph ran the cpu kernel with HIERTCN_BACKEND=reference: {ran}"


# The trace guarded on the contents of backends._resolved, the memo that the trace itself fills; in a process whose
# cache was empty (the first op call a compiled one) the second identical call failed that guard and compiled the same
# graph again.
def test_first_compiled_call_in_a_fresh_process_is_not_compiled_twice(monkeypatch):
    monkeypatch.setattr(sys.modules["hiertcn_fast.backends"], "_resolved", {})
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(lambda gi, gh, h: ops.gru_gates(gi, gh, h), backend=counter, fullgraph=True)
    for _ in range(3):
        compiled(gi, gh, h)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles of one graph for three identical calls"


def _module_cases(backend):
    torch.manual_seed(2)
    c = torch.randn(4, 2)
    conv = CausalConv1d(3, 4, 3, dilation=2, context_channels=2, activation="gelu", backend=backend)
    block = TemporalBlock(3, 5, 2, dilation=2, backend=backend)
    cell = GRUCell(3, 4, backend=backend)
    gru = GRU(3, 4, num_layers=2, batch_first=True, backend=backend)
    return [("CausalConv1d", conv, lambda x: conv(x, c[:x.shape[0]])), ("TemporalBlock", block, lambda x: block(x)),
            ("GRUCell", cell, lambda x: cell(x[:, 0])), ("GRU", gru, lambda x: gru(x)[0]),
            ("GRU.step", gru, lambda x: gru.step(x[:, 0])[1])]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_module_forwards_match_eager_with_parameter_gradients(backend):
    for name, module, fn in _module_cases(backend):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        with torch._dynamo.config.patch(allow_rnn=True):
            compiled = torch.compile(fn, fullgraph=True, backend=counter)
            for size in ((2, 5), (3, 6), (4, 7)):
                x = torch.randn(*size, 3)
                got, want = compiled(x), fn(x)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
                params = list(module.parameters())
                for g1, g2 in zip(torch.autograd.grad(got.square().sum(), params),
                                  torch.autograd.grad(want.square().sum(), params)):
                    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5, msg=name)
        limit = 3 if (name == "GRU" and backend == "reference") else 2
        assert counter.frame_count <= limit, (name, counter.frame_count)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_module_steps_match_forward(backend):
    """CausalConv1d.step and TemporalBlock.step compiled (fullgraph) over a sequence, with the batch changing: the
    forward's outputs."""
    torch.manual_seed(3)
    conv = CausalConv1d(3, 4, 3, dilation=2, context_channels=2, activation="relu", backend=backend).eval()
    block = TemporalBlock(3, 5, 2, dilation=2, backend=backend).eval()
    for module, has_context in ((conv, True), (block, False)):
        def one(x_t, state, context):
            return module.step(x_t, state, context) if has_context else module.step(x_t, state)

        torch._dynamo.reset()
        compiled = torch.compile(one, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            for batch in (2, 3):
                x, context = torch.randn(batch, 5, 3), torch.randn(batch, 2)
                state = module.init_state(batch)
                steps = torch.stack([compiled(x[:, t], state, context) for t in range(5)], 1)
                want = module(x, context) if has_context else module(x)
                torch.testing.assert_close(steps, want, rtol=1e-5, atol=1e-5)


def test_opcheck_of_the_triton_ops_not_checked_elsewhere():
    """The schema checks (what runs on CPU under the interpreter) of causal_conv1d_step_triton_out and
    gru_gates_backward_triton_out, which no other test opchecks."""
    if not torch.cuda.is_available() and not triton_interpreted():
        pytest.skip("the triton ops need a GPU or TRITON_INTERPRET=1")
    from hiertcn_fast.ops.conv import pack_weight

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight = torch.randn(2, 3, device=device), torch.randn(4, 3, 3, device=device)
    state = CausalConvState.zeros(2, 3, 3, 2, device=device)
    state.position.fill_(3)
    state.history.normal_()
    torch.library.opcheck(torch.ops.hiertcn_fast.causal_conv1d_step_triton_out.default,
                          (x, pack_weight(weight, 1), torch.randn(4, device=device), None, None, 2, 1, 1,
                           state.history, state.position, torch.empty(2, 4, device=device)),
                          test_utils=("test_schema",))
    gi, gh, h = torch.randn(2, 9, device=device), torch.randn(2, 9, device=device), torch.randn(2, 3, device=device)
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_backward_triton_out.default,
                          (torch.randn_like(h), gi, gh, h, torch.empty_like(gi), torch.empty_like(gh),
                           torch.empty_like(h)), test_utils=("test_schema",))


# ---- torch.func and forward-mode AD ----------------------------------------------------------------------------

def _func_cases():
    torch.manual_seed(4)
    D = torch.float64
    x, w = torch.randn(2, 5, 3, dtype=D), torch.randn(4, 3, 2, dtype=D)
    gi, gh, h = torch.randn(2, 12, dtype=D), torch.randn(2, 12, dtype=D), torch.randn(2, 4, dtype=D)
    wih, whh = torch.randn(12, 3, dtype=D), torch.randn(12, 4, dtype=D)
    items, lengths = torch.randn(2, 4, 3, dtype=D), torch.tensor([2, 0])
    hh, keep = torch.randn(1, 2, 4, dtype=D), torch.ones(2, dtype=D)
    return {
        "gru_gates": (lambda a, be: ops.gru_gates(a, gh, h, backend=be), gi),
        "causal_conv1d": (lambda a, be: ops.causal_conv1d(a, w, activation="tanh", backend=be), x),
        "gru_cell": (lambda a, be: ops.gru_cell(x[:, 0], h, a, whh, backend=be), wih),
        "gru": (lambda a, be: ops.gru(x, None, [(a, whh)], num_layers=1, backend=be)[0], wih),
        "session_update": (lambda a, be: ops.session_update(items, lengths, hh, keep, [(a, whh)], backend=be), wih),
        "session_update_steps": (lambda a, be: ops.session_update_steps(items[None], lengths[None], hh, keep[None],
                                                                        [(a, whh)], backend=be), wih),
    }


@pytest.mark.parametrize("op", list(_func_cases()))
def test_torch_func_grad_and_vmap_in_eager_run_the_reference(op):
    fn, primal = _func_cases()[op]
    got = torch.func.grad(lambda a: fn(a, None).square().sum())(primal)
    want = torch.func.grad(lambda a: fn(a, "reference").square().sum())(primal)
    torch.testing.assert_close(got, want)
    with pytest.raises(BackendUnavailableError, match="torch.func"):
        torch.func.grad(lambda a: fn(a, "cpu").sum())(primal)


# torch.compile of a torch.func.grad through an op on auto gave all-zero gradients, silently: under compile
# functorch_transforms_active() answered False, so auto picked the cpu kernels' autograd.Function, whose gradient the
# traced transform dropped (eager picks the reference, as documented).
@pytest.mark.parametrize("op", ["gru_gates", "causal_conv1d", "gru_cell", "session_update"])
def test_compiled_torch_func_grad_through_an_auto_op_gives_the_eager_gradient(op):
    fn, primal = _func_cases()[op]
    want = torch.func.grad(lambda a: fn(a, None).square().sum())(primal)
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(lambda a: fn(a, None).square().sum()), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(primal), want)


# A backend asked for by name that cannot run inside a transform must be refused, never give another answer:
# compiled, torch.func.grad through gru_gates(backend="cpu") returned zeros instead of the refusal eager gives.
def test_compiled_torch_func_grad_through_a_named_cpu_op_is_refused_not_zero():
    fn, primal = _func_cases()["gru_gates"]
    want = torch.func.grad(lambda a: fn(a, "reference").square().sum())(primal)
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(lambda a: fn(a, "cpu").square().sum()), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match="backend 'cpu' cannot run this call: torch.func transforms"):  # (wrapped)
        compiled(primal)
    assert want.abs().sum() > 0


# Eager torch.func.vmap of an op on auto runs the reference; compiled (fullgraph) it ran the cpu out op, which has no
# batching rule ("Batching rule not implemented for hiertcn_fast::gru_gates_out"): the transform went unseen while
# tracing.
@pytest.mark.parametrize("op", ["gru_gates", "causal_conv1d"])
def test_compiled_vmap_of_an_auto_op_runs_like_eager(op):
    if op == "gru_gates":  # every argument mapped: one row per sample
        gi, gh, h = (torch.randn(3, 2, n, dtype=torch.float64) for n in (12, 12, 4))
        per_sample = torch.func.vmap(lambda a, b, c: ops.gru_gates(a, b, c))
        primal = (gi, gh, h)
    else:
        fn, x = _func_cases()[op]
        per_sample = torch.func.vmap(lambda a: fn(a[None], None)[0])
        primal = (x,)
    want = per_sample(*primal)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(per_sample, fullgraph=True, backend="aot_eager")(*primal), want)


# Forward-mode AD (dual tensors): session_update_steps on auto once dropped the tangent silently (its no-gradient fast
# path), and until c83862f every op on auto failed in torch's words ("You must implement the jvp function", or "jvp
# is not implemented for the c++ API of custom Function yet. Please open a feature request"), nn.CausalConv1d and
# nn.GRUCell included. Auto now runs the reference while a dual level is active, as it does under torch.func
# transforms: the tangent equals the reference's and a finite difference; a kernel backend asked for by name says why
# it cannot run, and the level's end gives the kernels back.
@pytest.mark.parametrize("op", list(_func_cases()))
def test_forward_mode_ad_on_auto_runs_the_reference_and_a_named_kernel_backend_is_refused(op):
    fn, primal = _func_cases()[op]
    tangent = torch.randn_like(primal)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fn(fwAD.make_dual(primal, tangent), None)).tangent
        want = fwAD.unpack_dual(fn(fwAD.make_dual(primal, tangent), "reference")).tangent
        with pytest.raises(BackendUnavailableError, match=rf"{op}: backend 'cpu' cannot run this call: a "
                                                          r"forward-mode AD level.*backend 'reference'"):
            fn(fwAD.make_dual(primal, tangent), "cpu")
    assert got is not None
    torch.testing.assert_close(got, want)
    eps = 1e-6  # float64: a central difference agrees to about eps**2
    difference = (fn(primal + eps * tangent, None) - fn(primal - eps * tangent, None)) / (2 * eps)
    torch.testing.assert_close(got, difference, rtol=1e-6, atol=1e-7)
    assert torch.equal(fn(primal, "cpu"), fn(primal, None))  # outside the level, auto is the cpu kernels again


def test_forward_mode_ad_through_the_nn_modules_on_auto():
    torch.manual_seed(6)
    x, c = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    cases = [(CausalConv1d(3, 4, 3, dilation=2, context_channels=2, activation="gelu").double(),
              torch.nn.Conv1d(5, 4, 3, dilation=2).double(), lambda m, v: m(v, c)),
             (GRUCell(3, 4).double(), torch.nn.GRUCell(3, 4).double(), lambda m, v: m(v[:, 0]))]
    for ours, peer, call in cases:
        if isinstance(ours, CausalConv1d):  # the peer: nn.Conv1d over the left-padded concatenation
            peer.weight.data.copy_(torch.cat([ours.weight, ours.context_weight], 1))
            peer.bias.data.copy_(ours.bias)
            peer_call = lambda v: torch.nn.functional.gelu(peer(torch.nn.functional.pad(  # noqa: E731
                torch.cat([v, c[:, None].expand(-1, v.shape[1], -1)], 2).transpose(1, 2), (4, 0))).transpose(1, 2))
        else:
            peer.load_state_dict(ours.state_dict())
            peer_call = lambda v: peer(v[:, 0])  # noqa: E731
        tangent = torch.randn_like(x)
        with fwAD.dual_level():
            got = fwAD.unpack_dual(call(ours, fwAD.make_dual(x, tangent))).tangent
            want = fwAD.unpack_dual(peer_call(fwAD.make_dual(x, tangent))).tangent
        torch.testing.assert_close(got, want)


# ---- autocast --------------------------------------------------------------------------------------------------

def _conv_modules():
    torch.manual_seed(5)
    c, r = torch.randn(2, 2), torch.randn(2, 6, 4)
    return [("CausalConv1d", CausalConv1d(3, 4, 3, dilation=2, context_channels=2, activation="gelu"),
             lambda m, x: m(x, c)),
            ("CausalConv1d residual", CausalConv1d(3, 4, 3, dilation=2, activation="tanh"),
             lambda m, x: m(x, residual=r)),
            ("TemporalBlock", TemporalBlock(3, 5, 2, context_channels=2), lambda m, x: m(x, c)),
            ("TemporalBlock identity", TemporalBlock(3, 3, 2), lambda m, x: m(x)),
            ("TCN", TCN(3, [4, 4], 2, context_channels=2), lambda m, x: m(x, c))]


def test_conv_modules_run_in_the_autocast_dtype_with_float32_gradients():
    x = torch.randn(2, 6, 3)
    for name, module, fn in _conv_modules():
        want = fn(module, x)
        with torch.autocast(**BF16):
            got = fn(module, x)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2, msg=name)
        got.float().square().sum().backward()
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, (name, pname)
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (name, pname)
        want_grads = torch.autograd.grad(fn(module, x).square().sum(), list(module.parameters()))
        for (pname, p), g in zip(module.named_parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=0.1, atol=0.1 * g.abs().max().item() + 1e-3,
                                       msg=f"{name} {pname}")


def test_gru_modules_under_autocast_match_torch_nn_dtypes_and_values():
    torch.manual_seed(6)
    ours, theirs = GRU(3, 4, num_layers=2, batch_first=True), torch.nn.GRU(3, 4, num_layers=2, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    cell, torch_cell = GRUCell(3, 4), torch.nn.GRUCell(3, 4)
    torch_cell.load_state_dict(cell.state_dict())
    x = torch.randn(2, 5, 3)
    for x_dtype in (torch.float32, torch.bfloat16):
        for h_dtype in (None, torch.float32, torch.bfloat16):
            xx = x.to(x_dtype)
            hx = None if h_dtype is None else torch.randn(2, 2, 4).to(h_dtype)
            with torch.autocast(**BF16):
                got, want = ours(xx, hx), theirs(xx, hx)
                got_cell = cell(xx[:, 0], None if hx is None else hx[0])
                want_cell = torch_cell(xx[:, 0], None if hx is None else hx[0])
            for a, b in zip((*got, got_cell), (*want, want_cell)):
                assert a.dtype == b.dtype, (x_dtype, h_dtype)
                torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    params = list(ours.parameters())
    with torch.autocast(**BF16):
        out, _ = ours(x.bfloat16())
    grads = torch.autograd.grad(out.float().sum(), params)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_steps_run_in_the_states_dtype_under_autocast():
    torch.manual_seed(7)
    x, context = torch.randn(2, 5, 3), torch.randn(2, 2)
    modules = [(CausalConv1d(3, 4, 3, dilation=2, context_channels=2, activation="relu").eval(), True),
               (TemporalBlock(3, 5, 2, context_channels=2).eval(), True), (TCN(3, [4, 4], 2).eval(), False)]
    with torch.no_grad():
        for module, has_context in modules:
            plain, cast = module.init_state(2), module.init_state(2)
            for t in range(5):
                args = (context,) if has_context else ()
                want = module.step(x[:, t], plain, *args)
                with torch.autocast(**BF16):
                    got = module.step(x[:, t].bfloat16(), cast, *(a.bfloat16() for a in args))
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


# Under autocast a step on a state of another dtype than the parameters' (init_state(batch, dtype=torch.bfloat16) of
# a float32 block) failed in TemporalBlock.step with torch's own "mat1 and mat2 must have the same dtype" from inside
# nn.Linear; CausalConv1d.step and TCN.step refuse the same call with a TypeError naming the weight, and so does it
# now.
def test_temporal_block_step_on_a_bfloat16_state_under_autocast_is_not_an_internal_error():
    torch.manual_seed(8)
    block = TemporalBlock(3, 5, 2, context_channels=2).eval()
    x, context = torch.randn(2, 3), torch.randn(2, 2)
    state = block.init_state(2, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast(**BF16):
        with pytest.raises(TypeError, match="weight has dtype torch.float32 but the state holds torch.bfloat16"):
            block.step(x, state, context)
    assert not state.position.any()
    # The block in the state's dtype steps under autocast, in that dtype.
    block = block.bfloat16()
    with torch.no_grad(), torch.autocast(**BF16):
        assert block.step(x, state, context).dtype == torch.bfloat16


def test_linear_cross_entropy_under_autocast_follows_f_linear_with_float32_gradients():
    torch.manual_seed(9)
    features = torch.randn(6, 3, requires_grad=True)
    weight, bias = torch.randn(7, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    targets = torch.randint(0, 7, (6,))
    with torch.autocast(**BF16):
        loss = ops.linear_cross_entropy(features, weight, bias, targets)
        want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(features, weight, bias).float(), targets,
                                                 reduction="sum")
        with pytest.raises(BackendUnavailableError, match="autocast"):
            ops.linear_cross_entropy(features, weight, bias, targets, backend="cpu")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    grads = torch.autograd.grad(loss, (features, weight, bias))
    assert all(g.dtype == torch.float32 for g in grads)
    plain = torch.autograd.grad(ops.linear_cross_entropy(features, weight, bias, targets), (features, weight, bias))
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, rtol=5e-2, atol=5e-2)


def test_compiled_conv_modules_under_autocast_match_eager():
    x = torch.randn(2, 6, 3)
    for name, module, fn in _conv_modules()[::2]:
        with torch.autocast(**BF16):
            want = fn(module, x)
            want_grads = torch.autograd.grad(want.float().square().sum(), list(module.parameters()))
            torch._dynamo.reset()
            got = torch.compile(lambda x: fn(module, x), fullgraph=True, backend="aot_eager")(x)
            got_grads = torch.autograd.grad(got.float().square().sum(), list(module.parameters()))
        assert got.dtype == want.dtype == torch.bfloat16, name
        torch.testing.assert_close(got, want, msg=name)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
