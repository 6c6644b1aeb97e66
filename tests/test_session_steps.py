"""session_update_steps (all of a lane batch's session steps in one op) on every backend against
session_update's composition from torch ops and nn.GRUCell, applied step after step (an independent peer)."""

import pytest
import torch

from hiertcn_fast.ops import (session_update, session_update_reference, session_update_steps,
                              session_update_steps_reference)
from gru_helpers import assert_outputs_and_grads_match, layer_weights, session_update_composition
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, assert_close, rand

# (steps, batch, time, dim, hidden, layers, projected, bias, keep kind, items layout)
CASES = [
    (3, 5, 6, 4, 7, 2, True, True, "float", "padded"),
    (1, 1, 1, 3, 1, 1, False, False, "bool", "contiguous"),
    (7, 4, 3, 8, 5, 3, True, False, "float", "strided"),
    (5, 33, 20, 16, 128, 2, False, True, "float", "padded"),
    (2, 3, 4, 5, 6, 1, False, True, "zero", "strided"),
]


def steps_inputs(steps, batch, time, dim, hidden, layers, projected, bias, keep_kind, layout, dtype, device):
    """Lengths 0..time with every step holding a 0 and a full row, some whole steps empty; items as the model
    holds them ('padded': positions 1..time of a (steps, batch, time + 1, dim) batch), contiguous, or with
    strided rows that do not lie at one stride from step to step ('strided')."""
    if layout == "padded":
        items = rand(steps, batch, time + 1, dim, dtype=dtype, device=device)[:, :, 1:]
    elif layout == "strided":
        items = rand(batch, steps, time, dim, dtype=dtype, device=device, noncontiguous=True).transpose(0, 1)
    else:
        items = rand(steps, batch, time, dim, dtype=dtype, device=device)
    lengths = torch.randint(0, time + 1, (steps, batch), device=device)
    lengths[:, 0], lengths[:, -1] = 0, time
    if steps > 2:
        lengths[1] = 0  # a step where no lane has a session
    keep = {"float": (torch.rand(steps, batch, device=device) * 2).to(dtype),
            "bool": torch.rand(steps, batch, device=device) > 0.3,
            "zero": torch.zeros(steps, batch, dtype=dtype, device=device)}[keep_kind]
    h = rand(layers, batch, hidden, dtype=dtype, device=device)
    proj = [rand(dim + 1, dim, dtype=dtype, device=device, scale=0.5), rand(dim + 1, dtype=dtype, device=device)]
    weights = layer_weights(dim + 1 if projected else dim, hidden, layers, dtype, device, bias)
    return items, lengths, h, keep, weights, proj if projected else [None, None]


def composed_steps(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    """The peer: session_update_composition step after step, every state stacked."""
    states = [h]
    for step in range(items.shape[0]):
        states.append(session_update_composition(items[step], lengths[step], states[-1], keep[step], layers,
                                                  proj_weight, proj_bias))
    return torch.stack(states)


def split(rest, extra, per_layer):
    proj = list(rest[:extra]) + [None] * (2 - extra)
    w = rest[extra:]
    return proj, [w[i:i + per_layer] for i in range(0, len(w), per_layer)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_steps_match_session_update_step_by_step(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    items, lengths, h, keep, weights, (proj_weight, proj_bias) = steps_inputs(*case, dtype, device)
    per_layer = len(weights[0])
    extra = [t for t in (proj_weight, proj_bias) if t is not None]
    flat = [t for layer in weights for t in layer]

    def mine(items, h, keep, *rest):
        (pw, pb), layers = split(rest, len(extra), per_layer)
        return session_update_steps(items, lengths, h, keep, layers, proj_weight=pw, proj_bias=pb, backend=backend)

    def peer(items, h, keep, *rest):
        (pw, pb), layers = split(rest, len(extra), per_layer)
        return composed_steps(items, lengths, h, keep, layers, pw, pb)

    assert_outputs_and_grads_match(mine, peer, [items, h, keep, *extra, *flat], dtype)


def test_steps_equal_the_single_step_op_on_the_cpu_to_rounding():
    """The cpu backend's states against its own session_update called step after step, in float32 at HierTCN's
    size: the same up to the order of the products' sums."""
    items, lengths, h, keep, weights, _ = steps_inputs(10, 32, 20, 128, 128, 2, False, True, "bool", "padded",
                                                       torch.float32, "cpu")
    states = session_update_steps(items, lengths, h, keep, weights, backend="cpu")
    expected = [h]
    for step in range(10):
        expected.append(session_update(items[step], lengths[step], expected[-1], keep[step], weights, backend="cpu"))
    torch.testing.assert_close(states, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(states[0], h)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    items, lengths, h, keep, weights, proj = steps_inputs(3, 4, 3, 3, 4, 2, True, True, "float", "padded",
                                                          torch.float64, "cpu")
    flat = [t.detach().requires_grad_() for t in (items, h, keep, *proj, *[t for layer in weights for t in layer])]
    assert torch.autograd.gradcheck(
        lambda i, hh, k, pw, pb, *w: session_update_steps(i, lengths, hh, k, [w[:4], w[4:]], proj_weight=pw,
                                                          proj_bias=pb, backend=backend), flat)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_steps_give_the_state_alone(backend):
    items, lengths, h, keep, weights, _ = steps_inputs(1, 3, 4, 5, 6, 2, False, True, "bool", "contiguous",
                                                       torch.float64, "cpu")
    h.requires_grad_()
    out = session_update_steps(items[:0], lengths[:0], h, keep[:0], weights, backend=backend)
    assert out.shape == (1, *h.shape) and torch.equal(out[0], h)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(grad, torch.ones_like(h))


def test_rows_and_steps_without_sessions_keep_their_state():
    items, lengths, h, keep, weights, _ = steps_inputs(4, 5, 3, 4, 6, 2, False, True, "bool", "padded",
                                                       torch.float64, "cpu")
    out = session_update_steps(items, torch.zeros_like(lengths), h, torch.ones_like(keep), weights, backend="cpu")
    assert all(torch.equal(state, h) for state in out)
    out = session_update_steps(items, lengths, h, torch.zeros_like(keep), weights, backend="cpu")
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))


def test_cpu_backward_is_deterministic_and_keeps_no_item_embeddings():
    """Two runs give the same bits; the op keeps the sessions' shape for the backward, not the embeddings
    (of which the model's items are a view of the whole padded batch)."""
    items, lengths, h, keep, weights, proj = steps_inputs(5, 33, 7, 10, 40, 2, True, True, "float", "padded",
                                                          torch.float32, "cpu")
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (items, h, keep, *proj,
                                                                *[t for layer in weights for t in layer])]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = session_update_steps(leaves[0], lengths, leaves[1], leaves[2], [leaves[5:9], leaves[9:]],
                                       proj_weight=leaves[3], proj_bias=leaves[4], backend="cpu")
        assert leaves[0].untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in kept}
        assert kept  # the hooks see what the op keeps
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_a_graph_of_the_cpu_gradient_is_a_clear_error():
    items, lengths, h, keep, weights, _ = steps_inputs(2, 3, 3, 4, 5, 1, False, True, "bool", "padded",
                                                       torch.float64, "cpu")
    items.requires_grad_()
    out = session_update_steps(items, lengths, h, keep, weights, backend="cpu")
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.grad(out.sum(), items, create_graph=True)


@pytest.mark.cpu_kernels_only  # lengths out of range: the CUDA entry point clamps them (no device sync)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input_is_a_clear_error(backend):
    items, lengths, h, keep, weights, _ = steps_inputs(3, 4, 5, 6, 7, 2, False, True, "bool", "contiguous",
                                                       torch.float64, "cpu")

    def call(items=items, lengths=lengths, h=h, keep=keep, weights=weights):
        return session_update_steps(items, lengths, h, keep, weights, backend=backend)

    with pytest.raises(ValueError, match="item_embeddings must be 4-D"):
        call(items=items[0])
    with pytest.raises(ValueError, match=r"lengths \(steps, batch\)"):
        call(lengths=lengths[0])
    with pytest.raises(ValueError, match=r"keep \(steps, batch\)"):
        call(keep=keep[:2])
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(lengths=torch.full_like(lengths, 6))
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(lengths=torch.full_like(lengths, -1))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        call(lengths=lengths > 0)
    with pytest.raises(TypeError, match="dtype"):
        call(items=items.float())
    with pytest.raises(ValueError, match="hidden"):
        call(h=h[..., :5])
    with pytest.raises(ValueError):
        call(weights=weights[:1])  # a layer missing


@pytest.mark.cpu_kernels_only  # as above
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lengths_of_every_step_are_checked(backend):
    items, lengths, h, keep, weights, _ = steps_inputs(4, 3, 5, 6, 7, 1, False, True, "bool", "padded",
                                                       torch.float64, "cpu")
    for bad in (6, -1):
        wrong = lengths.clone()
        wrong[2, 1] = bad  # step 0 is fine
        with pytest.raises(ValueError, match="lengths must lie in"):
            session_update_steps(items, wrong, h, keep, weights, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("empty", ["batch", "time"])
def test_an_empty_batch_or_empty_sessions(backend, empty):
    items, lengths, h, keep, weights, _ = steps_inputs(3, 4, 5, 6, 7, 2, False, True, "float", "padded",
                                                       torch.float64, "cpu")
    if empty == "batch":
        items, lengths, h, keep = items[:, :0], lengths[:, :0], h[:, :0], keep[:, :0]
    else:
        items, lengths = items[:, :, :0], torch.zeros_like(lengths)
    leaves = [t.detach().requires_grad_() for t in (items, h, keep)]
    out = session_update_steps(*leaves[:1], lengths, leaves[1], leaves[2], weights, backend=backend)
    expected = composed_steps(items, lengths, h, keep, weights)
    assert out.shape == expected.shape
    assert_close(out, expected)
    peer = [t.detach().requires_grad_() for t in (items, h, keep)]
    wanted = torch.autograd.grad(composed_steps(peer[0], lengths, peer[1], peer[2], weights).sum(), peer,
                                 allow_unused=True)
    for grad, want, leaf in zip(torch.autograd.grad(out.sum(), leaves), wanted, leaves):
        assert grad.shape == leaf.shape
        assert_close(grad, torch.zeros_like(grad) if want is None else want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_other_layouts_and_dtypes_of_lengths_and_keep(backend):
    """int32 lengths and lengths, keep given as transposed views (a (batch, steps) table read per step): the
    values count, not the memory order; keep's gradient included."""
    items, lengths, h, keep, weights, proj = steps_inputs(5, 4, 3, 6, 7, 3, True, True, "float", "padded",
                                                          torch.float64, "cpu")
    lengths_t = lengths.t().contiguous().t().to(torch.int32)
    keep_t = keep.t().contiguous().t()
    assert not lengths_t.is_contiguous() and not keep_t.is_contiguous()
    flat = [t for layer in weights for t in layer]
    assert_outputs_and_grads_match(
        lambda i, hh, k, *w: session_update_steps(i, lengths_t, hh, k, [w[:4], w[4:8], w[8:]], proj_weight=proj[0],
                                                  proj_bias=proj[1], backend=backend),
        lambda i, hh, k, *w: composed_steps(i, lengths, hh, k, [w[:4], w[4:8], w[8:]], *proj),
        [items, h, keep_t, *flat], torch.float64)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_projection_without_bias(backend):
    items, lengths, h, keep, weights, (proj_weight, _) = steps_inputs(3, 4, 3, 5, 6, 2, True, True, "float",
                                                                      "padded", torch.float64, "cpu")
    flat = [t for layer in weights for t in layer]
    assert_outputs_and_grads_match(
        lambda i, hh, k, pw, *w: session_update_steps(i, lengths, hh, k, [w[:4], w[4:]], proj_weight=pw,
                                                      backend=backend),
        lambda i, hh, k, pw, *w: composed_steps(i, lengths, hh, k, [w[:4], w[4:]], pw, None),
        [items, h, keep, proj_weight, *flat], torch.float64)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_gradients(mode):
    items, lengths, h, keep, weights, proj = steps_inputs(4, 5, 3, 6, 7, 2, True, True, "bool", "padded",
                                                          torch.float64, "cpu")
    expected = composed_steps(items, lengths, h, keep, weights, *proj)
    with getattr(torch, mode)():
        out = session_update_steps(items.requires_grad_(), lengths, h, keep, weights, proj_weight=proj[0],
                                   proj_bias=proj[1], backend="cpu")
    assert not out.requires_grad
    assert_close(out, expected)
    # The forward alone keeps one step's gates as scratch, not every step's, and computes the same bits.
    with_graph = session_update_steps(items, lengths, h, keep, weights, proj_weight=proj[0], proj_bias=proj[1],
                                      backend="cpu")
    assert with_graph.requires_grad and torch.equal(out, with_graph.detach())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_states_are_the_callers_to_edit(backend):
    """out[0] is a copy of h, and editing the returned states in place (zeroing a lane's final state, say) before
    the backward works as for session_update: the op keeps its own copy for the backward."""
    items, lengths, h, keep, weights, _ = steps_inputs(3, 4, 3, 5, 6, 2, False, True, "float", "padded",
                                                       torch.float64, "cpu")
    leaves = [t.detach().requires_grad_() for t in (items, h, keep)]
    out = session_update_steps(leaves[0], lengths, leaves[1], leaves[2], weights, backend=backend)
    assert out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
    out[-1, :, 1] = 0
    got = torch.autograd.grad(out.square().sum(), leaves)
    peer = [t.detach().requires_grad_() for t in (items, h, keep)]
    expected = composed_steps(peer[0], lengths, peer[1], peer[2], weights) * 1.0
    expected[-1, :, 1] = 0
    for a, b in zip(got, torch.autograd.grad(expected.square().sum(), peer)):
        assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_layers_is_a_clear_error(backend):
    items, lengths, h, keep, _, _ = steps_inputs(2, 3, 3, 4, 5, 1, False, True, "bool", "padded", torch.float64,
                                                 "cpu")
    with pytest.raises(ValueError, match="at least one layer"):
        session_update_steps(items, lengths, h[:0], keep, [], backend=backend)
    with pytest.raises(ValueError, match="at least one layer"):
        session_update(items[0], lengths[0], h[:0], keep[0], [], backend=backend)


def test_torch_compile_fullgraph_cpu():
    items, lengths, h, keep, weights, proj = steps_inputs(3, 4, 5, 6, 7, 2, True, True, "float", "padded",
                                                          torch.float32, "cpu")
    flat = [t for layer in weights for t in layer]

    def run(backend, items, h, keep, pw, pb, *w):
        return session_update_steps(items, lengths, h, keep, [w[:4], w[4:]], proj_weight=pw, proj_bias=pb,
                                    backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(lambda *inputs: run("cpu", *inputs), fullgraph=True)
    assert_outputs_and_grads_match(compiled, lambda *inputs: run("reference", *inputs),
                                   [items, h, keep, *proj, *flat], torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_the_out_ops(device):
    ops = torch.ops.hiertcn_fast
    dtype = torch.float64 if device == "cpu" else torch.float32
    items, lengths, h, keep, weights, (pw, pb) = steps_inputs(3, 4, 3, 5, 6, 2, True, True, "float", "padded",
                                                              dtype, device)
    flat = [t for layer in weights for t in layer]

    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device=device)

    saved = dict(out=empty(4, 2, 4, 6), cells=empty(2, 3, 4, 6), session_mean=empty(3, 4, 5),
                 projected=empty(3, 4, 6), gates=empty(2, 3, 4, 24))
    torch.library.opcheck(ops.session_update_steps_forward_out.default, (items, lengths, h, keep, flat, pw, pb), saved)
    ops.session_update_steps_forward_out(items, lengths, h, keep, flat, pw, pb, **saved)
    assert_close(saved["out"], session_update_steps_reference(items, lengths, h, keep, weights, proj_weight=pw,
                                                              proj_bias=pb))
    grads = dict(grad_item_embeddings=torch.empty(items.shape, dtype=dtype, device=device), grad_h=torch.empty_like(h),
                 grad_weights=[torch.empty_like(t) for t in flat], grad_proj_weight=torch.empty_like(pw),
                 grad_proj_bias=torch.empty_like(pb), grad_keep=torch.empty_like(keep))
    torch.library.opcheck(ops.session_update_steps_backward_out.default,
                          (torch.randn_like(saved["out"]), items, lengths, keep, flat, pw, saved["session_mean"],
                           saved["projected"], saved["out"], saved["cells"], saved["gates"]), grads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_gpu(backend, dtype):
    items, lengths, h, keep, weights, proj = steps_inputs(4, 17, 9, 24, 96, 2, True, True, "bool", "padded", dtype,
                                                          "cuda")
    out = session_update_steps(items, lengths, h, keep, weights, proj_weight=proj[0], proj_bias=proj[1],
                               backend=backend)
    expected = composed_steps(items.double(), lengths, h.double(), keep, [[t.double() for t in w] for w in weights],
                              proj[0].double(), proj[1].double())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=6e-2, atol=6e-2)
