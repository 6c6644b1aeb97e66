"""gru_cell, gru and session_update on every backend against torch.nn.GRUCell / torch.nn.GRU (an
independent peer carrying the same weights) and against session_update's composition from torch ops."""

import types

import pytest
import torch
import torch.nn.functional as F

import hiertcn_fast
from hiertcn_fast.nn import GRU, GRUCell
from hiertcn_fast.ops import gru, gru_cell, gru_gates, session_update, session_update_reference
from gru_helpers import (assert_outputs_and_grads_match, leaves, layer_weights, session_update_composition, torch_gru,
                         torch_gru_cell)
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, CUDA, assert_close, rand


def backend_cases(cases, small_cases):
    """(backend, device, case) params: every case for the fast CPU backends, the small ones for triton
    (interpreted on the CPU) and cuda."""
    return [pytest.param(*p.values, case, marks=p.marks, id=f"{p.id}-{case}") for p in BACKEND_DEVICES
            for case in (cases if p.values[0] in ("reference", "cpu") else small_cases)]


# (batch, input, hidden, noncontiguous, bias): every hidden size with every batch size for the fast
# backends; the interpreted Triton kernels get the small ones.
CELL_CASES = [(batch, 2 + hidden % 11, hidden, (batch + hidden) % 2 == 1, hidden != 200)
              for hidden in (1, 7, 128, 200, 512) for batch in (1, 3, 256)]
CELL_CASES_SMALL = [(1, 3, 1, False, True), (3, 5, 7, True, True), (5, 4, 7, False, False), (3, 6, 128, True, True)]

# (batch, time, input, hidden, layers, noncontiguous, bias): time 1 and primes, 1..3 layers.
SEQUENCE_CASES = [(1, 1, 5, 1, 1, False, True), (3, 7, 4, 7, 2, True, True), (256, 5, 16, 128, 3, False, True),
                  (3, 13, 9, 200, 1, True, False), (1, 7, 12, 512, 2, False, True), (256, 1, 32, 512, 1, True, True)]
SEQUENCE_CASES_SMALL = [(1, 1, 3, 1, 1, False, True), (3, 5, 4, 7, 2, True, True), (2, 3, 5, 33, 3, False, False)]


def cell_inputs(batch, input_size, hidden, noncontiguous, bias, dtype, device):
    (weights,) = layer_weights(input_size, hidden, 1, dtype, device, bias, noncontiguous)
    return [rand(batch, input_size, dtype=dtype, device=device, noncontiguous=noncontiguous),
            rand(batch, hidden, dtype=dtype, device=device, noncontiguous=noncontiguous), *weights]


@pytest.mark.parametrize("backend,device,case", backend_cases(CELL_CASES, CELL_CASES_SMALL))
def test_cell_matches_torch_gru_cell(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    inputs = cell_inputs(*case, dtype, device)
    assert_outputs_and_grads_match(lambda *a: gru_cell(*a, backend=backend), torch_gru_cell, inputs, dtype)


def test_cell_and_session_update_under_inference_mode_and_no_grad():
    # The cell and session_update ops have an autograd kernel and a plain one; inference mode reaches the
    # plain one.
    inputs = cell_inputs(5, 3, 7, True, True, torch.float64, "cpu")
    expected = torch_gru_cell(*inputs)
    with torch.inference_mode():
        assert_close(gru_cell(*inputs, backend="cpu"), expected)
    with torch.no_grad():
        assert_close(gru_cell(*[t.requires_grad_() for t in inputs], backend="cpu"), expected)
    items, lengths, h, keep, weights, (pw, pb) = session_inputs(4, 3, 5, 6, 2, True, True, "mixed", "mixed",
                                                                torch.float64, "cpu")
    expected = session_update_reference(items, lengths, h, keep, weights, proj_weight=pw, proj_bias=pb)
    with torch.inference_mode():
        assert_close(session_update(items, lengths, h, keep, weights, proj_weight=pw, proj_bias=pb, backend="cpu"),
                     expected)


def sequence_inputs(batch, time, input_size, hidden, layers, noncontiguous, bias, dtype, device):
    x = rand(batch, time, input_size, dtype=dtype, device=device, noncontiguous=noncontiguous)
    h0 = rand(layers, batch, hidden, dtype=dtype, device=device, noncontiguous=noncontiguous)
    return x, h0, layer_weights(input_size, hidden, layers, dtype, device, bias, noncontiguous)


@pytest.mark.parametrize("backend,device,case", backend_cases(SEQUENCE_CASES, SEQUENCE_CASES_SMALL))
def test_sequence_matches_torch_gru(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    x, h0, weights = sequence_inputs(*case, dtype, device)
    per_layer = len(weights[0])
    flat = [t for layer in weights for t in layer]

    def regroup(flat_weights):
        return [flat_weights[i:i + per_layer] for i in range(0, len(flat_weights), per_layer)]

    assert_outputs_and_grads_match(
        lambda x, h0, *w: gru(x, h0, regroup(w), num_layers=len(weights), backend=backend),
        lambda x, h0, *w: torch_gru(x, h0, regroup(w)), [x, h0, *flat], dtype)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] in ("reference", "triton")])
def test_half_sequence_carries_the_gradient_through_time_in_float32(backend, device):
    # Over many steps dL/dh0 sums the contributions of every step. The composed layer carries the state,
    # and so that sum, in float32; rounding the state to float16 at every step (the gates op on float16
    # states, as the layer once did) lands measurably further from the float64 truth (by 1.1x to 4x over
    # seeds at these sizes). The interpreted Triton kernels get the shorter sequence.
    batch, input_size, hidden = 16, 4, 8
    time = 60 if backend == "triton" and device == "cpu" else 200
    x, h0, weights = sequence_inputs(batch, time, input_size, hidden, 1, False, True, torch.float64, device)
    grad_output = torch.randn(batch, time, hidden, dtype=torch.float64, device=device)

    def grad_h0(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, h0, *weights[0])]
        (grad,) = torch.autograd.grad(fn(*leaves), leaves[1], grad_output.to(dtype))
        return grad.double()

    def carried_in_float32(x, h0, *w):
        return gru(x, h0, [w], num_layers=1, backend=backend if x.dtype != torch.float64 else "reference")[0]

    def rounded_every_step(x, h0, w_ih, w_hh, b_ih, b_hh):
        gi, h, outputs = F.linear(x, w_ih, b_ih), h0[0], []
        for t in range(time):
            h = gru_gates(gi[:, t], F.linear(h, w_hh, b_hh), h, backend=backend)
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    truth = grad_h0(carried_in_float32, torch.float64)
    carried = (grad_h0(carried_in_float32, torch.float16) - truth).norm()
    rounded = (grad_h0(rounded_every_step, torch.float16) - truth).norm()
    assert carried < rounded


def test_sequence_without_initial_state_starts_from_zero():
    x, h0, weights = sequence_inputs(3, 5, 4, 6, 2, False, True, torch.float64, "cpu")
    output, h_n = gru(x, None, weights, num_layers=2)
    expected_output, expected_h_n = torch_gru(x, torch.zeros_like(h0), weights)
    assert_close(output, expected_output)
    assert_close(h_n, expected_h_n)


def test_cpu_float32_matches_torch_including_saturated_gates():
    # float32 on the CPU runs the vectorised exp of hiertcn/gru_gates.h; large biases drive most gates
    # into saturation, where its clamps act.
    inputs = cell_inputs(256, 16, 512, True, True, torch.float32, "cpu")
    inputs[4] = inputs[4] * 2000
    assert_outputs_and_grads_match(lambda *a: gru_cell(*a, backend="cpu"), torch_gru_cell, inputs, torch.float32)


# ---- session_update ------------------------------------------------------------------------------

# (batch, time, dim, hidden, layers, projected, bias, lengths, keep)
SESSION_CASES = [
    (5, 6, 4, 7, 2, True, True, "mixed", "mixed"),
    (4, 3, 8, 5, 1, False, True, "zero", "mixed"),
    (4, 3, 8, 5, 3, True, False, "mixed", "zero"),
    (1, 1, 3, 1, 1, False, False, "full", "bool"),
    # A bool keep with False rows small enough for the interpreted Triton kernels, and at a larger size.
    (4, 3, 5, 6, 1, True, True, "mixed", "bool"),
    (33, 20, 16, 128, 2, True, True, "mixed", "bool"),
]


def session_inputs(batch, time, dim, hidden, layers, projected, bias, lengths_kind, keep_kind, dtype, device):
    items = rand(batch, time, dim, dtype=dtype, device=device, noncontiguous=True)
    lengths = {"mixed": torch.randint(0, time + 1, (batch,), device=device),
               "zero": torch.zeros(batch, dtype=torch.int64, device=device),
               "full": torch.full((batch,), time, device=device)}[lengths_kind]
    if lengths_kind == "mixed":
        lengths[0], lengths[-1] = 0, time
    h = rand(layers, batch, hidden, dtype=dtype, device=device)
    keep = {"mixed": (torch.arange(batch, device=device) % 3 != 1).to(dtype),
            "zero": torch.zeros(batch, dtype=dtype, device=device),
            "bool": torch.arange(batch, device=device) % 2 == 0}[keep_kind]
    proj = [rand(dim + 1, dim, dtype=dtype, device=device, scale=0.5), rand(dim + 1, dtype=dtype, device=device)]
    weights = layer_weights(dim + 1 if projected else dim, hidden, layers, dtype, device, bias)
    return items, lengths, h, keep, weights, proj if projected else [None, None]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", SESSION_CASES, ids=str)
def test_session_update_matches_its_composition(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    items, lengths, h, keep, weights, (proj_weight, proj_bias) = session_inputs(*case, dtype, device)
    per_layer = len(weights[0])
    flat = [t for layer in weights for t in layer]
    extra = [t for t in (proj_weight, proj_bias) if t is not None]

    def split(rest):
        proj = list(rest[:len(extra)]) + [None] * (2 - len(extra))
        w = rest[len(extra):]
        return proj, [w[i:i + per_layer] for i in range(0, len(w), per_layer)]

    def mine(items, h, keep, *rest):
        (pw, pb), layers = split(rest)
        return session_update(items, lengths, h, keep, layers, proj_weight=pw, proj_bias=pb, backend=backend)

    def peer(items, h, keep, *rest):
        (pw, pb), layers = split(rest)
        return session_update_composition(items, lengths, h, keep, layers, pw, pb)

    assert_outputs_and_grads_match(mine, peer, [items, h, keep, *extra, *flat], dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_the_session_mean_keeps_float32_precision_over_long_sessions(backend, device):
    """The kernels summed a session step after step in float32: at 4096 steps of 0.1 the mean was off by 3.9e-5
    of itself (the error grows with the length; torch.sum's cascade keeps it near rounding). They now sum blocks
    of 64 steps in float32 and the blocks in float64. A GRU layer that passes its input through (z = 0, reset
    unused, h0 = 0) shows the mean: the output is tanh(mean + bias)."""
    dim, time = 4, 4096
    items = torch.full((3, time, dim), 0.1, device=device)
    items[1, :, :2] = 0.7
    items[2].uniform_(0, 1, generator=torch.Generator(device).manual_seed(3))
    lengths = torch.tensor([time, time - 1, 1000], device=device)
    w_ih = torch.cat([torch.zeros(2 * dim, dim), torch.eye(dim)]).to(device)
    b_ih = torch.cat([torch.zeros(dim), torch.full((dim,), -30.0), torch.full((dim,), 0.05)]).to(device)
    layer = [w_ih, torch.zeros(3 * dim, dim, device=device), b_ih, torch.zeros(3 * dim, device=device)]
    h0, keep = torch.zeros(1, 3, dim, device=device), torch.ones(3, device=device)
    out = session_update(items, lengths, h0, keep, [layer], backend=backend)
    means = torch.stack([items[row, :length].double().sum(0) / length
                         for row, length in enumerate(lengths.tolist())])
    expected = torch.tanh(means + 0.05)
    assert (out[0].double() - expected).abs().max().item() < 5e-7


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_session_update_takes_strided_lengths(backend, device):
    # Lengths sliced from a wider tensor (a column of per-lane fields, say): every backend reads the values,
    # not the memory after the first one. Between them lies 4 - length, never the next lane's length here.
    dtype = COMPARE_DTYPE[backend]
    items, lengths, h, keep, weights, _ = session_inputs(5, 4, 3, 6, 2, False, True, "mixed", "mixed", dtype, device)
    lengths[1:4] = torch.tensor([2, 0, 1])  # with "mixed"'s first 0 and last 4
    strided = torch.stack([lengths, 4 - lengths], dim=1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(strided, lengths)
    flat = [t for layer in weights for t in layer]
    assert_outputs_and_grads_match(
        lambda items, h, keep, *w: session_update(items, strided, h, keep, [w[:4], w[4:]], backend=backend),
        lambda items, h, keep, *w: session_update_composition(items, lengths, h, keep, [w[:4], w[4:]]),
        [items, h, keep, *flat], dtype)


def test_session_update_rows_without_session_keep_their_state():
    items, lengths, h, keep, weights, _ = session_inputs(4, 3, 5, 6, 2, False, True, "zero", "mixed",
                                                         torch.float64, "cpu")
    out = session_update(items, lengths, h, torch.ones_like(keep), weights)
    assert torch.equal(out, h)
    assert torch.equal(session_update(items, lengths, h, torch.zeros_like(keep), weights), torch.zeros_like(h))


def _storages_kept_for_backward(fn):
    """The data pointers of every storage the autograd graph keeps while fn runs (the C++ nodes' too)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, {t.untyped_storage().data_ptr() for t in kept}


@pytest.mark.parametrize("compiled_path", [False, True])
def test_session_update_keeps_no_item_embeddings_for_the_backward(compiled_path):
    """A mean's gradient does not depend on what was averaged: the cpu op keeps the sessions' shape, not the
    (batch, time, dim) embeddings, of which HierTCN's steps are views of the whole padded batch. Both the C++
    node and the autograd.Function torch.compile traces; the gradients still equal the composition's."""
    from hiertcn_fast.ops.gru import _SessionUpdateFunction

    items, lengths, h, keep, weights, proj = session_inputs(5, 4, 6, 7, 2, True, True, "mixed", "mixed",
                                                            torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in (items, h, keep, *proj, *[t for layer in weights for t in layer])]
    flat = [t for layer in weights for t in layer]

    def ours():
        if compiled_path:
            return _SessionUpdateFunction.apply(items, lengths, h, keep.to(h.dtype), *proj, *flat)
        return session_update(items, lengths, h, keep, weights, proj_weight=proj[0], proj_bias=proj[1], backend="cpu")

    out, kept = _storages_kept_for_backward(ours)
    assert h.untyped_storage().data_ptr() in kept  # the hooks see what the op keeps
    assert items.untyped_storage().data_ptr() not in kept
    expected = session_update_composition(items, lengths, h, keep, weights, *proj)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("which", ["gru_cell", "gru", "gru_gates", "session_update"])
def test_a_graph_of_the_kernels_gradient_is_a_clear_error(which):
    """The cpu kernels' backward builds no graph: create_graph=True would give higher derivatives without
    their terms (silently, before). It is refused; the reference builds the graph."""
    x, h, *w = [t.requires_grad_() for t in cell_inputs(3, 4, 5, True, True, torch.float64, "cpu")]
    xs, h0, layers = sequence_inputs(2, 3, 3, 4, 2, False, True, torch.float64, "cpu")
    items, lengths, hs, keep, weights, _ = session_inputs(4, 3, 3, 4, 2, False, True, "mixed", "mixed",
                                                          torch.float64, "cpu")
    calls = {"gru_cell": (lambda b: gru_cell(x, h, *w, backend=b), x),
             "gru": (lambda b: gru(xs.requires_grad_(), h0, layers, num_layers=2, backend=b)[0], xs),
             "gru_gates": (lambda b: gru_gates(*gates, backend=b), None),
             "session_update": (lambda b: session_update(items.requires_grad_(), lengths, hs, keep, weights,
                                                         backend=b), items)}
    gates = [torch.randn(3, 3 * 5, dtype=torch.float64, requires_grad=True) for _ in range(2)] + [
        torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    run, leaf = calls[which]
    leaf = gates[0] if leaf is None else leaf
    with pytest.raises(RuntimeError, match="once differentiable.*backend='reference'"):
        torch.autograd.grad(run("cpu").sum(), [leaf], create_graph=True)
    (grad,) = torch.autograd.grad(run("reference").sum(), [leaf], create_graph=True)
    assert grad.requires_grad


# ---- gradcheck, determinism, compile, opcheck -----------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    x, h, *w = [t.requires_grad_() for t in cell_inputs(3, 4, 5, True, True, torch.float64, "cpu")]
    assert torch.autograd.gradcheck(lambda *a: gru_cell(*a, backend=backend), (x, h, *w))

    xs, h0, layers = sequence_inputs(2, 3, 3, 4, 2, False, True, torch.float64, "cpu")
    flat = [t.requires_grad_() for t in (xs, h0, *[t for layer in layers for t in layer])]
    assert torch.autograd.gradcheck(
        lambda x, h0, *w: gru(x, h0, [w[:4], w[4:]], num_layers=2, backend=backend), flat)

    items, lengths, h, keep, weights, proj = session_inputs(4, 3, 3, 4, 2, True, True, "mixed", "mixed",
                                                            torch.float64, "cpu")
    flat = [t.requires_grad_() for t in (items, h, keep, *proj, *[t for layer in weights for t in layer])]
    assert torch.autograd.gradcheck(
        lambda i, hh, k, pw, pb, *w: session_update(i, lengths, hh, k, [w[:4], w[4:]], proj_weight=pw, proj_bias=pb,
                                                    backend=backend), flat)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] in ("cpu", "cuda")])
def test_backward_is_deterministic(backend, device):
    x, h0, weights = sequence_inputs(33, 9, 10, 40, 2, False, True, torch.float32, device)
    items, lengths, h, keep, su_weights, proj = session_inputs(33, 5, 10, 40, 2, True, True, "mixed", "mixed",
                                                               torch.float32, device)
    runs = []
    for _ in range(2):
        params = [t.detach().clone().requires_grad_() for layer in weights for t in layer]
        inputs = [x.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()]
        output, h_n = gru(*inputs, [params[:4], params[4:]], num_layers=2, backend=backend)
        (output.square().sum() + h_n.sum()).backward()
        su_params = [t.detach().clone().requires_grad_() for t in (items, *proj)]
        session_update(su_params[0], lengths, h, keep, su_weights, proj_weight=su_params[1], proj_bias=su_params[2],
                       backend=backend).square().sum().backward()
        runs.append([t.grad for t in inputs + params + su_params])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    # Under torch.compile the cpu and cuda backends run the Python autograd.Functions (eager runs their C++
    # autograd nodes): every output and the gradient of every input (a floating keep included) must be the
    # float64 reference's.
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    dtype = torch.float32
    x, h0, weights = sequence_inputs(3, 2, 5, 6, 2, False, True, dtype, device)
    items, lengths, h, keep, su_weights, proj = session_inputs(3, 4, 5, 6, 2, True, True, "mixed", "mixed", dtype,
                                                               device)
    flat = [t for layer in weights + su_weights for t in layer]

    def step(backend, x, h0, items, h, keep, pw, pb, *flat_weights):
        layers = [flat_weights[i:i + 4] for i in range(0, len(flat_weights), 4)]
        output, h_n = gru(x, h0, layers[:2], num_layers=2, backend=backend)
        cell = gru_cell(x[:, 0], h0[0], *layers[0], backend=backend)
        updated = session_update(items, lengths, h, keep, layers[2:], proj_weight=pw, proj_bias=pb, backend=backend)
        return output, h_n, cell, updated

    torch._dynamo.reset()
    compiled = torch.compile(lambda *inputs: step(backend, *inputs), fullgraph=True)
    assert_outputs_and_grads_match(compiled, lambda *inputs: step("reference", *inputs),
                                   [x, h0, items, h, keep, *proj, *flat], dtype)


@pytest.mark.parametrize("time", [1, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_layer_op(time, bias):
    """The layer op behind ops.gru (its C++ autograd node, fake kernel and schema) passes opcheck, with and
    without gradients, at one step (which keeps no output) and over a sequence."""
    x, h0, weights = sequence_inputs(3, time, 5, 6, 1, False, bias, torch.float64, "cpu")
    args = [x, h0[0], *weights[0]] + ([None, None] if not bias else [])
    op = torch.ops.hiertcn_fast.gru_layer.default
    torch.library.opcheck(op, [t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    torch.library.opcheck(op, [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args])


def test_default_sequence_skips_the_checks_and_falls_back_to_them(monkeypatch):
    """With no backend asked for, a well-formed call runs the layer op with no pass through the full checks, and
    gives nn.GRU's outputs and gradients (its result may be edited in place before the backward, as after
    torch.nn); a malformed one reaches the full checks, which name what is wrong."""
    import sys

    gru_module = sys.modules["hiertcn_fast.ops.gru"]  # (the package's attribute of that name is the function)
    checked = gru_module._check_gru
    calls = []

    def spy(*args):
        calls.append(len(args))
        return checked(*args)

    monkeypatch.setattr(gru_module, "_check_gru", spy)
    x, h0, weights = sequence_inputs(2, 5, 4, 3, 2, True, True, torch.float64, "cpu")
    inputs = leaves([x, h0] + [t for layer in weights for t in layer])
    layers = [inputs[2:6], inputs[6:10]]
    out, h_n = gru(inputs[0], inputs[1], layers, num_layers=2)
    assert calls == [] and "GruLayerFunction" in out.grad_fn.name()
    peer_inputs = leaves(inputs)
    want_out, want_h = torch_gru(peer_inputs[0], peer_inputs[1], [peer_inputs[2:6], peer_inputs[6:10]])
    assert_close(out, want_out)
    assert_close(h_n, want_h)
    first = out.detach().clone()
    out[:, 0] = 0.0  # in place, before the backward
    want_out = want_out.clone()
    want_out[:, 0] = 0.0
    seed = torch.randn_like(out)
    ((out * seed).sum() + h_n.sum()).backward()
    ((want_out * seed).sum() + want_h.sum()).backward()
    for got, want in zip(inputs, peer_inputs):
        assert_close(got.grad, want.grad)
    with torch.no_grad():  # the forward alone, the same bits
        no_grad_out, no_grad_h = gru(x, h0, weights, num_layers=2)
    assert torch.equal(no_grad_out, first) and torch.equal(no_grad_h, h_n.detach()) and no_grad_out.grad_fn is None
    assert calls == []
    with pytest.raises(ValueError, match="num_layers"):
        gru(x, h0, weights, num_layers=3)
    with pytest.raises(TypeError, match="num_layers must be an int"):
        gru(x, h0, weights, num_layers=2.0)
    assert calls == [4, 4]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_compiled_ops(device):
    ops = torch.ops.hiertcn_fast
    dtype = torch.float64 if device == "cpu" else torch.float32

    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device=device)

    x, h0, weights = sequence_inputs(3, 4, 5, 6, 1, False, True, dtype, device)
    (w_ih, w_hh, b_ih, b_hh), h0 = weights[0], h0[0]
    saved = dict(output=empty(3, 4, 6), gates=empty(4, 3, 24))
    torch.library.opcheck(ops.gru_layer_forward_out.default, (x, h0, w_ih, w_hh, b_ih, b_hh), saved)
    ops.gru_layer_forward_out(x, h0, w_ih, w_hh, b_ih, b_hh, **saved)
    grads = dict(grad_x=torch.empty_like(x), grad_h0=torch.empty_like(h0), grad_w_ih=torch.empty_like(w_ih),
                 grad_w_hh=torch.empty_like(w_hh), grad_b_ih=torch.empty_like(b_ih), grad_b_hh=torch.empty_like(b_hh))
    torch.library.opcheck(ops.gru_layer_backward_out.default,
                          (torch.randn_like(saved["output"]), x, h0, w_ih, w_hh, *saved.values()), grads)

    cell_args = [x[:, 0].detach().requires_grad_(), h0.detach().requires_grad_(), w_ih, w_hh, b_ih, b_hh]
    torch.library.opcheck(ops.gru_cell.default, cell_args)

    items, lengths, h, keep, weights, (pw, pb) = session_inputs(4, 3, 5, 6, 2, True, True, "mixed", "mixed", dtype,
                                                                device)
    items = items.contiguous()
    flat = [t for layer in weights for t in layer]
    saved = dict(out=torch.empty_like(h), states=torch.empty_like(h), session_mean=empty(4, 5),
                 projected=empty(4, 6), gates=empty(2, 4, 24))
    su_args = [items.detach().requires_grad_(), lengths, h.detach().requires_grad_(), keep, flat, pw, pb]
    torch.library.opcheck(ops.session_update.default, su_args)
    torch.library.opcheck(ops.session_update_forward_out.default, (items, lengths, h, keep, flat, pw, pb), saved)
    ops.session_update_forward_out(items, lengths, h, keep, flat, pw, pb, **saved)
    grads = dict(grad_item_embeddings=torch.empty_like(items), grad_h=torch.empty_like(h),
                 grad_weights=[torch.empty_like(t) for t in flat], grad_proj_weight=torch.empty_like(pw),
                 grad_proj_bias=torch.empty_like(pb))
    torch.library.opcheck(ops.session_update_backward_out.default,
                          (torch.randn_like(h), items, lengths, h, keep, flat, pw, saved["session_mean"],
                           saved["projected"], saved["states"], saved["gates"]), grads)


def test_triton_session_mean_ops():
    # Fake-tensor checks of a triton_op need a GPU (the interpreter reads data pointers): schema only here.
    device = "cuda" if CUDA else "cpu"
    items, lengths = rand(3, 4, 5, dtype=torch.float32, device=device), torch.tensor([0, 4, 2], device=device)
    mean, grad_items = torch.empty(3, 5, device=device), torch.empty(3, 4, 5, device=device)
    checks = None if CUDA else ("test_schema",)
    kwargs = {} if checks is None else {"test_utils": checks}
    ops = torch.ops.hiertcn_fast
    torch.library.opcheck(ops.session_mean_triton_out.default, (items, lengths, mean), **kwargs)
    torch.library.opcheck(ops.session_mean_backward_triton_out.default, (torch.randn_like(mean), lengths, grad_items),
                          **kwargs)


# ---- half types on the GPU ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_gpu(backend, dtype):
    x, h0, weights = sequence_inputs(17, 9, 24, 96, 2, True, True, dtype, "cuda")
    output, h_n = gru(x, h0, weights, num_layers=2, backend=backend)
    expected_output, expected_h_n = torch_gru(x.double(), h0.double(), [[t.double() for t in w] for w in weights])
    assert output.dtype == dtype and h_n.dtype == dtype
    # bfloat16 keeps 8 significant bits (eps 2**-7): 3e-2 is about 4 eps. Both GPU paths' roundings emulated on
    # the CPU (half-type products and states, float32 gates) at these shapes, over 1000 seeds, stay within a
    # third of that bound for every output here, and within half of it with an extra rounding of split-K sums.
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(output.double(), expected_output, **tol)
    torch.testing.assert_close(h_n.double(), expected_h_n, **tol)
    items, lengths, h, keep, su_weights, _ = session_inputs(17, 5, 24, 96, 2, False, True, "mixed", "mixed", dtype,
                                                            "cuda")
    out = session_update(items, lengths, h, keep, su_weights, backend=backend)
    expected = session_update_composition(items.double(), lengths, h.double(), keep.double(),
                                          [[t.double() for t in w] for w in su_weights])
    torch.testing.assert_close(out.double(), expected, **tol)


def _relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_type_gradients_on_gpu(dtype):
    """The cuda backend's gradients in half types (its saved gates keep pre-activations there, from which the
    backward recomputes the gates in float32) against autograd through torch's GRU in float64, per gradient as a
    relative error of its norm. Pre-activations scaled to saturate part of the gates."""
    x, h0, weights = sequence_inputs(17, 9, 24, 96, 2, False, True, dtype, "cuda")
    weights = [[(t * 3).detach() for t in w] for w in weights]  # saturating gates
    inputs = leaves([x, h0, *[t for w in weights for t in w]])
    output, h_n = gru(inputs[0], inputs[1], [inputs[2:6], inputs[6:10]], num_layers=2, backend="cuda")
    grad_output, grad_h_n = torch.randn_like(output), torch.randn_like(h_n)
    grads = torch.autograd.grad((output, h_n), inputs, (grad_output, grad_h_n))
    exact = leaves([t.double() for t in inputs])
    expected_output, expected_h_n = torch_gru(exact[0], exact[1], [exact[2:6], exact[6:10]])
    expected = torch.autograd.grad((expected_output, expected_h_n), exact, (grad_output.double(), grad_h_n.double()))
    # Each half-type product rounds its output (2^-8 relative in bfloat16), step after step through time. The
    # reference composition on the CPU in these types, at these shapes, errs by up to 2.1e-2 (bfloat16) and
    # 2.7e-3 (float16); the bounds leave room for the cuda path's other roundings (its states are stored in the
    # half type). A wrong saved layout or index gives errors of order 1.
    bound = 8e-2 if dtype == torch.bfloat16 else 2e-2
    errors = [_relative_error(g, e) for g, e in zip(grads, expected)]
    assert max(errors) < bound, errors

    items, lengths, h, keep, su_weights, _ = session_inputs(17, 5, 24, 96, 2, False, True, "mixed", "mixed", dtype,
                                                            "cuda")
    su_weights = [[(t * 3).detach() for t in w] for w in su_weights]
    inputs = leaves([items, h, *[t for w in su_weights for t in w]])
    out = session_update(inputs[0], lengths, inputs[1], keep, [inputs[2:6], inputs[6:10]], backend="cuda")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact = leaves([t.double() for t in inputs])
    expected_out = session_update_composition(exact[0], lengths, exact[1], keep.double(), [exact[2:6], exact[6:10]])
    expected = torch.autograd.grad(expected_out, exact, grad_out.double())
    errors = [_relative_error(g, e) for g, e in zip(grads, expected)]
    assert max(errors) < bound, errors


# ---- nn modules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_module_is_a_drop_in(bias):
    peer = torch.nn.GRUCell(5, 8, bias=bias)
    cell = GRUCell(5, 8, bias=bias)
    cell.load_state_dict(peer.state_dict())
    x, h = torch.randn(3, 5), torch.randn(3, 8)
    assert_close(cell(x, h), peer(x, h), torch.float32)
    assert_close(cell(x), peer(x), torch.float32)
    assert_close(cell(x[0], h[0]), peer(x[0], h[0]), torch.float32)
    assert cell.state_dict().keys() == peer.state_dict().keys()


@pytest.mark.parametrize("batch_first", [True, False])
def test_gru_module_is_a_drop_in_and_steps(batch_first):
    peer = torch.nn.GRU(5, 8, num_layers=2, batch_first=batch_first)
    module = GRU(5, 8, num_layers=2, batch_first=batch_first)
    module.load_state_dict(peer.state_dict())
    x = torch.randn(3, 7, 5) if batch_first else torch.randn(7, 3, 5)
    h0 = torch.randn(2, 3, 8)
    for args in ((x, h0), (x,), (x[0] if batch_first else x[:, 0], h0[:, 0])):
        for got, want in zip(module(*args), peer(*args)):
            assert_close(got, want, torch.float32)
            # Contiguous where nn.GRU's is (time-major output once came as a transposed view, which view() refused).
            if want.is_contiguous():
                assert got.is_contiguous() and got.view(-1).shape == want.view(-1).shape
    stepper = GRU(5, 8, num_layers=2, batch_first=True)
    stepper.load_state_dict(peer.state_dict())
    sequence = x if batch_first else x.transpose(0, 1)
    h, outputs = h0, []
    for t in range(sequence.shape[1]):
        out, h = stepper.step(sequence[:, t], h)
        outputs.append(out)
    expected_output, expected_h_n = peer(x, h0)
    expected_output = expected_output if batch_first else expected_output.transpose(0, 1)
    assert_close(torch.stack(outputs, 1), expected_output, torch.float32)
    assert_close(h, expected_h_n, torch.float32)


def test_gru_module_rejects_bidirectional():
    with pytest.raises(ValueError, match="bidirectional"):
        GRU(3, 4, bidirectional=True)


def peer_and_module(peer):
    """A hiertcn_fast.nn twin of the torch.nn.GRU / GRUCell ``peer``, with its weights."""
    if isinstance(peer, torch.nn.GRUCell):
        module = GRUCell(peer.input_size, peer.hidden_size, bias=peer.bias)
    else:
        module = GRU(peer.input_size, peer.hidden_size, num_layers=peer.num_layers, bias=peer.bias,
                     batch_first=peer.batch_first)
    module.load_state_dict(peer.state_dict())
    return module


def outputs_and_grads(module, run, leaves):
    """run(module) -> tensors (a PackedSequence counts as its data); with the gradients of a fixed
    random projection of them w.r.t. ``leaves`` and the module's parameters."""
    outputs = [t.data if isinstance(t, torch.nn.utils.rnn.PackedSequence) else t for t in run(module)]
    generator = torch.Generator().manual_seed(0)
    loss = sum((t.float() * torch.randn(t.shape, generator=generator)).sum() for t in outputs)
    return outputs, torch.autograd.grad(loss, [*leaves, *module.parameters()])


def assert_bf16_close(got, want):
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=5e-2)


AUTOCAST_CASES = {  # case: (input shape, hx shape or None)
    "cell": ((3, 5), None), "cell-hx": ((3, 5), (3, 8)), "cell-unbatched": ((5,), (8,)), "gru": ((3, 6, 5), None),
    "gru-hx": ((3, 6, 5), (2, 3, 8)), "gru-time-major": ((6, 3, 5), (2, 3, 8)), "gru-unbatched": ((6, 5), None),
    "gru-step": ((3, 5), (2, 3, 8))}


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_gru_modules_run_under_autocast_like_torch(case):
    """A bf16 activation from an autocast region (nn.Linear's output) runs through GRU / GRUCell as
    through torch's: bf16 out, close to torch's, gradients reach x and the float32 parameters."""
    torch.manual_seed(0)
    peer = torch.nn.GRUCell(5, 8) if case.startswith("cell") else \
        torch.nn.GRU(5, 8, num_layers=2, batch_first=case != "gru-time-major")
    module, projection = peer_and_module(peer), torch.nn.Linear(5, 5)
    x_shape, hx_shape = AUTOCAST_CASES[case]
    x = torch.randn(x_shape, requires_grad=True)
    hx = None if hx_shape is None else torch.randn(hx_shape, dtype=torch.bfloat16)  # e.g. an earlier bf16 output

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            activation = projection(x)
            assert activation.dtype == torch.bfloat16
            if case == "gru-step":
                if m is module:
                    return m.step(activation, hx)
                output, h_n = m(activation[:, None], hx)
                return output[:, 0], h_n
            result = m(activation, hx)
            return result if isinstance(result, tuple) else (result,)

    got, got_grads = outputs_and_grads(module, run, [x])
    want, want_grads = outputs_and_grads(peer, run, [x])
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert_bf16_close(a, b)
    for a, b, leaf in zip(got_grads, want_grads, [x, *module.parameters()]):
        assert a.dtype == leaf.dtype == torch.float32
        assert_bf16_close(a, b)


@pytest.mark.parametrize("autocast_dtype,x_dtype,hx_dtype,parameter_dtype", [
    *((*case, torch.float32) for case in [
        (torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16, torch.float32, None),
        (torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16, None),
        (torch.bfloat16, torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16, None), (torch.float16, torch.float32, torch.bfloat16),
        (torch.float16, torch.float16, None)]),
    # A module in a half type given float32: torch casts its weights to float32 (ours refused the mismatch).
    (torch.bfloat16, torch.float32, None, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32, None, torch.float16), (torch.float16, torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, None, torch.float16)])
def test_gru_modules_under_cpu_autocast_run_in_the_dtype_torch_runs_them_in(autocast_dtype, x_dtype, hx_dtype,
                                                                             parameter_dtype):
    """CPU autocast runs torch's GRU and GRUCell in hx's dtype (the input's without hx) where that is the
    autocast dtype, else in float32, whatever the parameters' dtype. The drop-ins give torch's dtype for every
    combination, and close values."""
    torch.manual_seed(0)
    for peer, x, hx in ((torch.nn.GRUCell(5, 8), torch.randn(3, 5), torch.randn(3, 8)),
                        (torch.nn.GRU(5, 8, num_layers=2), torch.randn(6, 3, 5), torch.randn(2, 3, 8))):
        peer = peer.to(parameter_dtype)
        module = peer_and_module(peer).to(parameter_dtype)  # (load_state_dict keeps the module's own dtype)
        assert all(p.dtype == parameter_dtype for p in module.parameters())
        x = x.to(x_dtype)
        hx = None if hx_dtype is None else hx.to(hx_dtype)
        with torch.autocast("cpu", dtype=autocast_dtype):
            got, want = module(x, hx), peer(x, hx)
        for a, b in zip(*(result if isinstance(result, tuple) else (result,) for result in (got, want))):
            assert a.dtype == b.dtype
            assert_bf16_close(a.float(), b.float())


def test_gru_modules_pass_their_own_tensors_outside_autocast(monkeypatch):
    """Outside autocast the op gets the caller's tensors and the parameters themselves (the fast paths
    key on them), and stays so after an autocast region."""
    import hiertcn_fast.nn.gru as module_file
    calls = []
    sequence_op = module_file.gru
    monkeypatch.setattr(module_file, "gru",
                        lambda *args, **kwargs: calls.append(args) or sequence_op(*args, **kwargs))
    # The cell's kernel is called straight from GRUCell.forward (the shortcut of a default call) or through
    # ops.gru_cell: seen where both meet, at the op.
    cell_op = torch.ops.hiertcn_fast.gru_cell
    monkeypatch.setattr(torch.ops.hiertcn_fast, "gru_cell", types.SimpleNamespace(
        default=lambda *args: calls.append(args) or cell_op.default(*args)))
    cell, sequence = GRUCell(5, 8), GRU(5, 8, num_layers=2, batch_first=True)
    x, h, xs, h0 = torch.randn(3, 5), torch.randn(3, 8), torch.randn(3, 4, 5), torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cell(x, h), sequence(xs, h0)
    calls.clear()
    cell(x, h), sequence(xs, h0)
    (cx, ch, *cell_weights), (sx, sh, layers) = calls
    assert cx is x and ch is h and sx is xs and sh is h0
    expected = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert all(a is b for a, b in zip(cell_weights, expected, strict=True))
    assert all(a is b for mine, theirs in zip(layers, sequence.all_weights, strict=True)
               for a, b in zip(mine, theirs, strict=True))


def pack_with_ties_reversed(padded, lengths, batch_first):
    """A PackedSequence whose sorted_indices put equal lengths in reverse row order: as valid as the
    one pack_padded_sequence makes (whose sort keeps them in order), and torch.nn.GRU honours it."""
    order = sorted(range(len(lengths)), key=lambda row: (-int(lengths[row]), -row))
    sorted_indices = torch.tensor(order)
    rows = padded.index_select(0 if batch_first else 1, sorted_indices)
    packed = torch.nn.utils.rnn.pack_padded_sequence(rows, lengths[sorted_indices], batch_first=batch_first)
    return torch.nn.utils.rnn.PackedSequence(packed.data, packed.batch_sizes, sorted_indices,
                                             torch.empty_like(sorted_indices).scatter_(0, sorted_indices,
                                                                                      torch.arange(len(order))))


@pytest.mark.parametrize("num_layers,batch_first,packing,with_hx", [
    (1, True, "unsorted", False), (3, False, "unsorted", True), (2, True, "sorted", True),
    (2, False, "sorted", False), (2, True, "ties-reversed", True), (1, False, "ties-reversed", False)])
def test_gru_module_takes_a_packed_sequence_like_torch(num_layers, batch_first, packing, with_hx):
    """A PackedSequence in, a PackedSequence out (same batch_sizes and indices as torch's), and h_n holds
    every sequence's state after its own last element, not at the padded end."""
    torch.manual_seed(0)
    peer = torch.nn.GRU(5, 8, num_layers=num_layers, batch_first=batch_first)
    module = peer_and_module(peer)
    lengths = torch.tensor([7, 5, 5, 2, 2, 1]) if packing == "sorted" else torch.tensor([2, 7, 1, 5, 2, 5])
    padded = torch.randn(len(lengths), 7, 5, requires_grad=True)
    hx = torch.randn(num_layers, len(lengths), 8, requires_grad=True) if with_hx else None
    leaves = [padded] + ([hx] if with_hx else [])

    def run(m):
        rows = padded if batch_first else padded.transpose(0, 1)
        packed = pack_with_ties_reversed(rows, lengths, batch_first) if packing == "ties-reversed" else \
            torch.nn.utils.rnn.pack_padded_sequence(rows, lengths, batch_first=batch_first,
                                                    enforce_sorted=packing == "sorted")
        output, h_n = m(packed, hx)
        assert isinstance(output, torch.nn.utils.rnn.PackedSequence)
        run.packed_outputs.append(output)
        return output, h_n

    run.packed_outputs = []
    got, got_grads = outputs_and_grads(module, run, leaves)
    want, want_grads = outputs_and_grads(peer, run, leaves)
    mine, theirs = run.packed_outputs
    assert torch.equal(mine.batch_sizes, theirs.batch_sizes)
    for a, b in ((mine.sorted_indices, theirs.sorted_indices), (mine.unsorted_indices, theirs.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(got + list(got_grads), want + list(want_grads)):
        assert_close(a, b, torch.float32)


def test_gru_modules_compile_fullgraph_as_documented():
    """GRUCell compiles as is; GRU, like torch.nn.GRU, with torch._dynamo.config.allow_rnn (its docstring
    says so). Under autocast the compiled module runs in the dtype the eager one does."""
    torch.manual_seed(0)
    cell, sequence = GRUCell(5, 7), GRU(5, 7, num_layers=2, batch_first=True)
    x, xs = torch.randn(3, 5), torch.randn(3, 4, 5)
    torch._dynamo.reset()
    assert_close(torch.compile(cell, fullgraph=True)(x), cell(x), torch.float32)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(sequence, fullgraph=True)
        for got, want in zip(compiled(xs), sequence(xs)):
            assert_close(got, want, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for inputs in (xs, xs.bfloat16()):  # CPU autocast runs the GRU in the input's dtype (no hx)
                for got, want in zip(compiled(inputs), sequence(inputs)):
                    assert got.dtype == want.dtype == inputs.dtype
                    assert_bf16_close(got.float(), want.float())



# ---- bad input -----------------------------------------------------------------------------------

def test_gru_modules_name_input_and_hx_in_their_errors():
    """Errors name the module's arguments (input, hx) and the shapes the caller passed, before any unsqueeze."""
    gru_module, two_layers, cell = GRU(5, 7), GRU(5, 7, num_layers=2, batch_first=True), GRUCell(5, 7)
    x, x_unbatched = torch.randn(4, 6, 5), torch.randn(6, 5)  # time 4, batch 6
    input_size = r"input.size\(-1\) must be equal to input_size. Expected 5, got 3"
    for call in (lambda: gru_module(torch.randn(4, 6, 3)), lambda: gru_module(torch.randn(6, 3)),
                 lambda: two_layers.step(torch.randn(6, 3)), lambda: cell(torch.randn(4, 3)),
                 lambda: cell(torch.randn(3))):
        with pytest.raises(ValueError, match=input_size):
            call()
    batched = r"GRU: for batched input, hx \(num_layers, batch, hidden_size\) must have shape "
    for call, message in (
            (lambda: gru_module(x, torch.randn(1, 6, 8)),
             batched + r"\(1, 6, 7\), got \(1, 6, 8\) \(input is of shape \(4, 6, 5\)\)"),
            (lambda: gru_module(x, torch.randn(1, 4, 7)), batched + r"\(1, 6, 7\), got \(1, 4, 7\)"),
            (lambda: gru_module(x, torch.randn(6, 7)), batched + r"\(1, 6, 7\), got \(6, 7\)"),
            (lambda: two_layers(x, torch.randn(1, 4, 7)), batched + r"\(2, 4, 7\), got \(1, 4, 7\)"),
            (lambda: two_layers.step(x[:, 0], torch.randn(2, 6, 7)), batched + r"\(2, 4, 7\), got \(2, 6, 7\)"),
            (lambda: gru_module(x_unbatched, torch.randn(1, 6, 7)),
             r"GRU: for unbatched 2-D input, hx \(num_layers, hidden_size\) must have shape \(1, 7\), "
             r"got \(1, 6, 7\) \(input is of shape \(6, 5\)\)"),
            (lambda: gru_module(torch.nn.utils.rnn.pack_sequence([x_unbatched, x_unbatched[:2]]), torch.randn(1, 3, 7)),
             batched + r"\(1, 2, 7\), got \(1, 3, 7\) \(input is a PackedSequence of batch 2\)"),
            (lambda: cell(torch.randn(5), torch.randn(1, 7)),
             r"GRUCell: for unbatched 1-D input, hx \(hidden_size,\) must have shape \(7,\), got \(1, 7\) "
             r"\(input is of shape \(5,\)\)"),
            (lambda: cell(torch.randn(4, 5), torch.randn(7)),
             r"GRUCell: for batched 2-D input, hx \(batch, hidden_size\) must have shape \(4, 7\), got \(7,\)"),
            (lambda: cell(torch.randn(4, 5), torch.randn(3, 7)), r"hx .* must have shape \(4, 7\), got \(3, 7\)"),
            (lambda: cell(torch.randn(4, 5), torch.randn(4, 8)), r"hx .* must have shape \(4, 7\), got \(4, 8\)")):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match=r"GRU: input dtype \(torch.float64\) does not match the parameters' dtype"):
        gru_module(x.double())
    with pytest.raises(ValueError, match="does not match"):  # torch.nn.GRU raises a ValueError: caught alike
        gru_module(x.double())
    with pytest.raises(TypeError, match=r"\(torch.int64\) does not match .* The input must be floating point: "
                                        r"input.to\(torch.float32\)"):  # not module.to(torch.int64)
        gru_module(x.long())
    with pytest.raises(TypeError, match="GRUCell: hx has dtype torch.float64 but input has torch.float32"):
        cell(torch.randn(4, 5), torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="GRUCell: hx is on meta but input is on cpu"):
        cell(torch.randn(4, 5), torch.randn(4, 7, device="meta"))
    with pytest.raises(ValueError, match="GRU: input is on meta but the parameters are on cpu"):
        gru_module(x.to("meta"))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        gru_module([x])


def test_bad_input_is_a_clear_error():
    x, h, w_ih, w_hh, b_ih, b_hh = cell_inputs(2, 3, 4, False, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"^w_hh must have shape \(12, 4\)"):
        gru_cell(x, h, w_ih, w_hh[:, :3], b_ih, b_hh)
    with pytest.raises(ValueError, match=r"^w_ih must have 3 \* hidden = 12 rows \(gates r, z, n"):
        gru_cell(x, h, w_ih[:8], w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"^w_ih must have shape \(12, 5\), got \(12, 3\)"):
        gru_cell(torch.randn(2, 5), h, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(TypeError, match=r"^w_ih has dtype torch.float64 but h has torch.float32"):
        gru_cell(x, h, w_ih.double(), w_hh, b_ih, b_hh)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but h has torch.float32"):
        gru_cell(x.double(), h, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match="b_ih and b_hh must be given together"):
        gru_cell(x, h, w_ih, w_hh, b_ih, None)
    with pytest.raises(ValueError, match="x has batch 3 but h has batch 2"):
        gru_cell(torch.randn(3, 3), h, w_ih, w_hh, b_ih, b_hh)
    if not CUDA:
        with pytest.raises(hiertcn_fast.BackendUnavailableError, match="cuda"):
            gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend="cuda")

    xs, h0, weights = sequence_inputs(2, 3, 3, 4, 2, False, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"one \(w_ih, w_hh\[, b_ih, b_hh\]\) sequence per layer \(num_layers=3\)"):
        gru(xs, None, weights, num_layers=3)
    with pytest.raises(ValueError, match=r"h0 \(num_layers, batch, hidden\) must have shape \(2, 2, 4\)"):
        gru(xs, h0[:, :1], weights, num_layers=2)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(w_ih, w_hh\) or \(w_ih, w_hh, b_ih, b_hh\)"):
        gru(xs, h0, [weights[0], weights[1][:3]], num_layers=2)
    with pytest.raises(ValueError, match=r"weights\[1\] \(w_hh\) must have 3 \* hidden = 12 rows"):
        gru(xs, h0, [weights[0], [weights[1][0], weights[1][1][:8]]], num_layers=2)
    with pytest.raises(ValueError, match=r"weights\[1\] \(w_ih\) is on meta but h0 is on cpu"):
        gru(xs, h0, [weights[0], [weights[1][0].to("meta"), weights[1][1]]], num_layers=2)

    items, lengths, hs, keep, su_weights, _ = session_inputs(4, 3, 3, 4, 2, False, True, "mixed", "mixed",
                                                             torch.float32, "cpu")
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        session_update(items, lengths.float(), hs, keep, su_weights)
    for backend in ("reference", "cpu"):  # a mask of the rows with a session is not their lengths
        with pytest.raises(TypeError, match="lengths must be an integer tensor of session lengths, got torch.bool"):
            session_update(items, lengths > 0, hs, keep, su_weights, backend=backend)
    with pytest.raises(TypeError, match="got torch.bool"):
        session_update_reference(items, lengths > 0, hs, keep, su_weights)
    with pytest.raises(ValueError, match=r"keep \(batch,\) must have shape \(4,\)"):
        session_update(items, lengths, hs, keep[:3], su_weights)
    with pytest.raises(ValueError, match=r"weights\[0\] \(w_ih\) must have shape \(12, 5\)"):
        session_update(items, lengths, hs, keep, su_weights, proj_weight=torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, time = 3\]"):
        session_update(items, lengths + 5, hs, keep, su_weights, backend="cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_missing_weight_or_half_a_bias_pair_is_refused_on_every_backend(backend):
    """A weight given as None is a TypeError naming it (not an AttributeError from inside the checks), and a
    layer with b_ih but not b_hh (or the reverse) is refused alike on every backend, where the reference backend
    used to compute with the one bias given."""
    x, h, w_ih, w_hh, b_ih, b_hh = cell_inputs(2, 3, 4, False, True, torch.float32, "cpu")
    for args, name in (((None, w_hh), "w_ih"), ((w_ih, None), "w_hh")):
        with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor, got NoneType"):
            gru_cell(x, h, *args, backend=backend)
    xs, h0, weights = sequence_inputs(2, 3, 3, 4, 2, False, True, torch.float32, "cpu")
    second = list(weights[1])
    with pytest.raises(TypeError, match=r"^weights\[1\] \(w_hh\) must be a torch.Tensor, got NoneType"):
        gru(xs, h0, [weights[0], [second[0], None, *second[2:]]], num_layers=2, backend=backend)
    for half in ([*second[:3], None], [*second[:2], None, second[3]]):
        with pytest.raises(ValueError, match=r"^weights\[1\]: b_ih and b_hh must be given together"):
            gru(xs, h0, [weights[0], half], num_layers=2, backend=backend)
    items, lengths, hs, keep, su_weights, _ = session_inputs(4, 3, 3, 4, 1, False, True, "mixed", "mixed",
                                                             torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"^weights\[0\]: b_ih and b_hh must be given together"):
        session_update(items, lengths, hs, keep, [[*su_weights[0][:3], None]], backend=backend)



def test_gru_modules_refuse_an_empty_time_axis_and_unknown_backends_clearly():
    """An empty time axis is named as such, in the caller's layout (batch_first=False included); an unknown
    backend name is refused by the constructor, as CausalConv1d's is, not at the first forward."""
    from hiertcn_fast.nn import GRU, GRUCell
    for batch_first, shape in ((True, (3, 0, 5)), (False, (0, 3, 5))):
        module = GRU(5, 7, batch_first=batch_first)
        with pytest.raises(ValueError, match=rf"empty time axis \(dimension {1 if batch_first else 0} of shape "
                                             rf"\({shape[0]}, {shape[1]}, 5\)"):
            module(torch.randn(*shape))
    with pytest.raises(ValueError, match="empty time axis"):
        GRU(5, 7)(torch.randn(0, 5))
    for make in (lambda: GRU(5, 7, backend="bogus"), lambda: GRUCell(5, 7, backend="bogus")):
        with pytest.raises(ValueError, match="bogus"):
            make()


def test_reference_ops_run_on_fake_tensors():
    """The value checks of session_update's lengths, the loss's targets and a step state's positions read values,
    which fake tensors (FakeTensorMode: opcheck, export, shape propagation) do not have: skipped there, as under
    torch.compile (they raised DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hiertcn_fast.ops import CausalConvState, causal_conv1d_step, linear_cross_entropy

    with FakeTensorMode():
        calls = {
            "session_update": lambda backend: session_update(
                torch.randn(3, 4, 6), torch.tensor([0, 2, 4]), torch.randn(1, 3, 4), torch.ones(3),
                [[torch.randn(12, 6), torch.randn(12, 4)]], backend=backend),
            "linear_cross_entropy": lambda backend: linear_cross_entropy(
                torch.randn(5, 4), torch.randn(7, 4), None, torch.randint(0, 7, (5,)), backend=backend),
            "causal_conv1d_step": lambda backend: causal_conv1d_step(
                torch.randn(2, 4), torch.randn(4, 4, 3), CausalConvState.zeros(2, 4, 3), backend=backend),
        }
        for name, call in calls.items():
            for backend in ("reference", "cpu"):
                out = call(backend)
                assert type(out).__name__ == "FakeTensor", (name, backend)


def test_num_layers_must_be_an_int():
    """A float num_layers failed inside torch (new_zeros) with an unhelpful TypeError."""
    x, h0 = torch.randn(2, 3, 4), torch.randn(1, 2, 5)
    weights = [[torch.randn(15, 4), torch.randn(15, 5)]]
    for value, error in ((1.0, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="num_layers must be"):
            gru(x, h0, weights, num_layers=value)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("what", ["cell", "sequence of 1", "sequence of 4", "module GRUCell", "module GRU"])
def test_the_result_may_be_edited_in_place_before_the_backward(backend, device, what):
    """h = cell(x, h); h[done] = 0, then backward: fine after torch.nn, an error on the cpu backend, whose
    backward kept the very tensor it returned. The gradients equal torch.nn's with the same edit."""
    torch.manual_seed(3)
    dtype = COMPARE_DTYPE[backend]
    time = 4 if what in ("sequence of 4", "module GRU") else 1
    peer = (torch.nn.GRUCell(5, 6) if "cell" in what.lower() else torch.nn.GRU(5, 6, batch_first=True)).to(device,
                                                                                                            dtype)
    x = torch.randn(3, 5, device=device, dtype=dtype) if "cell" in what.lower() else \
        torch.randn(3, time, 5, device=device, dtype=dtype)
    weights = list(peer.parameters())
    if what == "cell":
        def ours(x):
            return gru_cell(x, torch.zeros(3, 6, device=device, dtype=dtype), *weights, backend=backend)
    elif what.startswith("sequence"):
        def ours(x):
            return gru(x, None, [weights], num_layers=1, backend=backend)[0]
    else:
        module = (GRUCell(5, 6, backend=backend) if what == "module GRUCell" else
                  GRU(5, 6, batch_first=True, backend=backend)).to(device, dtype)
        module.load_state_dict(peer.state_dict())
        weights = list(module.parameters())

        def ours(x):
            out = module(x)
            return out if what == "module GRUCell" else out[0]

    def theirs(x):
        out = peer(x)
        return out if isinstance(peer, torch.nn.GRUCell) else out[0]

    grads = []
    for run, parameters in ((ours, weights), (theirs, list(peer.parameters()))):
        leaf = x.clone().requires_grad_()
        out = run(leaf)
        out[0] = 0  # the edit, in place
        out.mul_(2)
        grads.append(torch.autograd.grad(out.square().sum(), [leaf, *parameters]))
    for got, expected in zip(*grads):
        assert_close(got, expected, dtype)
