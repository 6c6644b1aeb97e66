"""linear_cross_entropy (the fused full-softmax training loss) against PyTorch's F.cross_entropy of F.linear, an
independent peer: loss and every gradient, shapes with vector tails, extreme logits, empty batches,
gradcheck, the compiled row op (opcheck, thread-count independence) and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.backends import use_backend
from hiertcn_fast.ops import linear_cross_entropy, linear_cross_entropy_reference
from helpers import rand

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def peer(features, weight, bias, targets):
    return F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum")


def _leaves(events, dim, classes, dtype, bias=True, scale=1.0):
    features = rand(events, dim, dtype=dtype, scale=scale).requires_grad_()
    weight = rand(classes, dim, dtype=dtype, scale=dim ** -0.5).requires_grad_()
    b = rand(classes, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, classes, (events,))
    return features, weight, b, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("events,dim,classes", [(1, 3, 1), (7, 5, 17), (33, 64, 100), (300, 64, 1297)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_cross_entropy_of_linear(dtype, events, dim, classes, bias):
    features, weight, b, targets = _leaves(events, dim, classes, dtype, bias)
    leaves = [t for t in (features, weight, b) if t is not None]
    ours = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    expected = peer(features, weight, b, targets)
    torch.testing.assert_close(ours, expected, **TOL[dtype])
    # A non-unit upstream gradient, as the trainer's loss scaling gives.
    for got, want in zip(torch.autograd.grad(ours * 0.37, leaves), torch.autograd.grad(expected * 0.37, leaves)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_the_cpu_path_is_taken_and_reference_matches():
    features, weight, b, targets = _leaves(20, 8, 30, torch.float64)
    fused = linear_cross_entropy(features, weight, b, targets)
    assert fused.grad_fn is not None and "LinearCrossEntropy" in fused.grad_fn.name()
    reference = linear_cross_entropy(features, weight, b, targets, backend="reference")
    assert "LinearCrossEntropy" not in reference.grad_fn.name()
    torch.testing.assert_close(fused, reference, **TOL[torch.float64])
    torch.testing.assert_close(linear_cross_entropy_reference(features, weight, b, targets), reference)


def test_extreme_logits_stay_finite():
    """Logits in the thousands (a row's softmax underflows almost everywhere) give the peer's finite loss."""
    features, weight, b, targets = _leaves(16, 4, 50, torch.float32, scale=300.0)
    ours = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    expected = peer(features, weight, b, targets)
    assert torch.isfinite(ours) and expected.item() > 100
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-3)
    grads = torch.autograd.grad(ours, [features, weight, b])
    assert all(torch.isfinite(g).all() for g in grads)


def test_empty_batch_is_zero_loss_with_zero_gradients():
    features, weight, b, targets = _leaves(0, 6, 9, torch.float32)
    loss = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, [weight, b])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_gradcheck():
    features, weight, b, targets = _leaves(5, 3, 7, torch.float64)
    assert torch.autograd.gradcheck(lambda f, w, bb: linear_cross_entropy(f, w, bb, targets, backend="cpu"),
                                    (features, weight, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_of_rows_give_the_peer_result(monkeypatch, dtype):
    """Blocks of 7 rows over 50 events (the last block partial), and the default blocks over 2,100 events (1,024,
    1,024, then 52 rows): loss and every gradient equal the peer's, and two runs are bitwise the same."""
    import hiertcn_fast.ops.loss as loss_module

    for events, classes, rows in ((50, 13, 7), (2100, 9, None)):
        if rows is not None:
            monkeypatch.setattr(loss_module, "_MIN_BLOCK_ROWS", rows)
            monkeypatch.setattr(loss_module, "_MAX_BLOCK_ROWS", rows)
        else:
            monkeypatch.undo()
            assert loss_module._block_rows(classes, 4) == 1024
        features, weight, b, targets = _leaves(events, 6, classes, dtype)
        runs = []
        for _ in range(2):
            ours = linear_cross_entropy(features, weight, b, targets, backend="cpu")
            runs.append((ours, *torch.autograd.grad(ours * 1.7, [features, weight, b])))
        expected = peer(features, weight, b, targets)
        wanted = (expected, *torch.autograd.grad(expected * 1.7, [features, weight, b]))
        for got, again, want in zip(*runs, wanted):
            torch.testing.assert_close(got, want, **TOL[dtype])
            assert torch.equal(got, again)


def test_keeps_gradients_not_the_logits_for_the_backward():
    """What the loss keeps for the backward is the gradients (features' and weight's sizes), never an (events,
    classes) buffer: with 600 events and 500 classes the logits would be 30x the features."""
    features, weight, b, targets = _leaves(600, 10, 500, torch.float32)
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    assert sorted(kept) == sorted([(600, 10), (500, 10), (500,)])
    grads = torch.autograd.grad(loss, [features, weight, b])
    for got, want in zip(grads, torch.autograd.grad(peer(features, weight, b, targets), [features, weight, b])):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_a_batch_of_few_rows_keeps_its_logits_gradient_no_larger_than_the_weights():
    """No more events than features (4 against 10): the loss keeps the (events, classes) gradient of its logits,
    here smaller than the weight's gradient the blocked path would keep, with the weight and the features (the
    leaves themselves: no copy), and the backward's products on it give the peer's gradients, scaled by the
    incoming gradient."""
    features, weight, b, targets = _leaves(4, 10, 500, torch.float64)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    assert sorted(tuple(t.shape) for t in kept) == sorted([(4, 500), (500, 10), (4, 10)])
    assert any(t is weight for t in kept) and any(t is features for t in kept)
    leaves = [features, weight, b]
    got = torch.autograd.grad(loss * 3.0, leaves)
    want = torch.autograd.grad(peer(features, weight, b, targets) * 3.0, leaves)
    for one, other in zip(got, want):
        torch.testing.assert_close(one, other, **TOL[torch.float64])
    torch.testing.assert_close(loss, peer(features, weight, b, targets), **TOL[torch.float64])


@pytest.mark.parametrize("events", [40, 3], ids=["blocked", "few rows"])  # 5 features: few rows at 3 events
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_the_gradients_asked_for(needs, events):
    """A frozen output layer, or fixed features: the gradients asked for equal the peer's, and the ones not asked
    for are neither computed nor kept (a batch of few rows keeps its logits' gradient, and the weight or the
    features where the other's gradient needs them)."""
    features, weight, b, targets = _leaves(events, 5, 23, torch.float64)
    leaves = (features, weight, b)
    for leaf, need in zip(leaves, needs):
        leaf.requires_grad_(need)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ours = linear_cross_entropy(*leaves, targets, backend="cpu")
    if events > 5:
        assert len(kept) == sum(needs)
    else:
        assert [tuple(t.shape) for t in kept] == [(events, 23)] + [(23, 5)] * needs[0] + [(events, 5)] * needs[1]
    asked = [leaf for leaf in leaves if leaf.requires_grad]
    for got, want in zip(torch.autograd.grad(ours, asked), torch.autograd.grad(peer(*leaves, targets), asked)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_without_gradients_the_loss_alone():
    """Under no_grad and inference_mode (evaluation) the loss is the peer's and has no graph."""
    features, weight, b, targets = _leaves(70, 8, 31, torch.float64)
    expected = peer(features, weight, b, targets)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            ours = linear_cross_entropy(features, weight, b, targets, backend="cpu")
        assert ours.grad_fn is None and not ours.requires_grad
        torch.testing.assert_close(ours, expected.detach(), **TOL[torch.float64])


@pytest.mark.parametrize("events", [9, 3], ids=["blocked", "few rows"])
def test_backward_twice_and_double_backward(events):
    """retain_graph: a second backward gives the same gradients again; a graph of the gradient
    (create_graph=True) is a clear error (the cpu path is once differentiable), not a silently wrong second
    derivative."""
    features, weight, b, targets = _leaves(events, 4, 6, torch.float64)
    loss = linear_cross_entropy(features, weight, b, targets, backend="cpu")
    first = torch.autograd.grad(loss, [features, weight, b], retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, [features, weight, b], retain_graph=True)
    for one, two in zip(first, second):
        assert torch.equal(one * 2.0, two)
    # A graph of the gradient would have none of the loss's second-order terms: refused, not silently wrong.
    with pytest.raises(RuntimeError, match="once differentiable.*backend='reference'"):
        torch.autograd.grad(loss, [features], create_graph=True)
    reference = linear_cross_entropy(features, weight, b, targets, backend="reference")
    (grad_features,) = torch.autograd.grad(reference, [features], create_graph=True)
    assert grad_features.requires_grad


def test_forward_mode_derivatives_run_the_reference():
    """Dual tensors (forward-mode AD): auto runs the reference, whose tangent is right; the cpu path has none
    (a bias-only tangent came back None, a features tangent failed inside the product)."""
    import torch.autograd.forward_ad as forward_ad

    features, weight, b, targets = (t.detach() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                    for t in _leaves(8, 3, 5, torch.float64))
    directions = [torch.randn_like(t) for t in (features, weight, b)]
    expected = torch.func.jvp(lambda f, w, bb: peer(f, w, bb, targets), (features, weight, b), tuple(directions))[1]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, d) for t, d in zip((features, weight, b), directions)]
        tangent = forward_ad.unpack_dual(linear_cross_entropy(*duals, targets)).tangent
    torch.testing.assert_close(tangent, expected, **TOL[torch.float64])


def _row_op(logits, targets, bias):
    loss = torch.empty(logits.shape[0], dtype=logits.dtype)
    torch.ops.hiertcn_fast.softmax_xent_out(logits, targets, bias, loss=loss)
    return logits, loss


def test_row_op_is_softmax_minus_one_hot_and_thread_count_independent():
    logits = rand(50, 301, dtype=torch.float32, scale=3.0)
    targets = torch.randint(0, 301, (50,))
    bias = rand(301, dtype=torch.float32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_row_op(logits.clone(), targets, bias))
    finally:
        torch.set_num_threads(previous)
    (grad1, loss1), (grad2, loss2) = results
    assert torch.equal(grad1, grad2) and torch.equal(loss1, loss2)
    z = (logits + bias).double()
    expected_grad = torch.softmax(z, 1) - F.one_hot(targets, 301).double()
    torch.testing.assert_close(grad1.double(), expected_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1.double(), torch.logsumexp(z, 1) - z.gather(1, targets[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_opcheck_row_op():
    logits = rand(6, 11, dtype=torch.float32)
    torch.library.opcheck(torch.ops.hiertcn_fast.softmax_xent_out.default,
                          (logits, torch.randint(0, 11, (6,)), rand(11, dtype=torch.float32)),
                          dict(loss=torch.empty(6)))


@pytest.mark.parametrize("events", [3, 40], ids=["few rows", "blocked"])  # 5 features: few rows at 3 events
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_loss_op(events, bias):
    """The whole-loss op (its C++ autograd node, its fake kernel, its schema) passes opcheck with and without
    gradients, on both of its forward paths (block_rows 16: three blocks at 40 events)."""
    features, weight, b, targets = _leaves(events, 5, 9, torch.float64, bias)
    op = torch.ops.hiertcn_fast.linear_cross_entropy.default
    torch.library.opcheck(op, (features, weight, b, targets, 16))
    torch.library.opcheck(op, (features.detach(), weight.detach(), None if b is None else b.detach(), targets, 16))


def test_the_loss_op_checks_its_arguments_itself():
    """The default path calls the compiled op with no Python checks in front: the op itself refuses what the entry
    point's checks refuse, before writing anything (and the entry point then says why in its own words)."""
    features, weight, b, targets = _leaves(4, 3, 5, torch.float32)
    op = torch.ops.hiertcn_fast.linear_cross_entropy.default
    bad = [
        ((features[0], weight, b, targets, 8), "features must be 2-D"),
        ((features.half(), weight, b, targets, 8), "float32 or float64"),
        ((features, weight[:, :2], b, targets, 8), r"weight must be \(classes, 3\)"),
        ((features, weight.double(), b, targets, 8), "weight must have the dtype of features"),
        ((features, weight, b[:4], targets, 8), "bias must have shape"),
        ((features, weight, b.double(), targets, 8), "bias must have the dtype of features"),
        ((features, weight, b, targets.int(), 8), "targets must be a 1-D int64 tensor"),
        ((features, weight, b, targets[:3], 8), "targets must be a 1-D int64 tensor"),
        ((features, weight, b, torch.tensor([0, 5, 1, 2]), 8), r"targets must lie in \[0, 5\), got values in \[0, 5\]"),
        ((features, weight, b, torch.tensor([0, -100, 1, 2]), 8), r"got values in \[-100, 2\]"),
        ((features, weight, b, targets, 0), "block_rows must be >= 1"),
    ]
    for args, message in bad:
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=message):
                op(*args)


def test_the_default_path_calls_the_op_and_falls_back_to_the_checks(monkeypatch):
    """With no backend asked for, a good call goes straight to the compiled op (the checked entry point is not
    run) and gives the peer's loss and gradients; a bad one reaches the checked entry point, whose error names
    the argument in this package's words."""
    import hiertcn_fast.ops.loss as loss_module

    checked = loss_module._checked_linear_cross_entropy
    calls = []

    def spy(*args):
        calls.append(args[-1])
        return checked(*args)

    monkeypatch.setattr(loss_module, "_checked_linear_cross_entropy", spy)
    features, weight, b, targets = _leaves(6, 4, 9, torch.float64)
    loss = linear_cross_entropy(features, weight, b, targets)
    assert calls == [] and "LinearCrossEntropy" in loss.grad_fn.name()
    assert torch.equal(linear_cross_entropy(features, weight, b, targets, backend="auto"), loss) and calls == []
    expected = peer(features, weight, b, targets)
    torch.testing.assert_close(loss, expected, **TOL[torch.float64])
    leaves = [features, weight, b]
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\), got values in \[0, 9\]"):
        linear_cross_entropy(features, weight, b, torch.tensor([0, 9, 1, 1, 2, 3]))
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but features has torch.float64"):
        linear_cross_entropy(features, weight.float(), b, targets)
    assert calls == [None, None]
    linear_cross_entropy(features, weight, b, targets, backend="cpu")
    assert calls == [None, None, "cpu"]
    # Where a block or the environment asks for another backend, an explicit "auto" still means auto: checked.
    with use_backend("reference"):
        assert "LinearCrossEntropy" in linear_cross_entropy(features, weight, b, targets, backend="auto").grad_fn.name()
        assert "LinearCrossEntropy" not in linear_cross_entropy(features, weight, b, targets).grad_fn.name()
    assert calls == [None, None, "cpu", "auto", None]


@pytest.mark.parametrize("events", [3, 40], ids=["few rows", "blocked"])
def test_a_backward_for_some_inputs_gives_their_gradients(events):
    """Every leaf requires grad, and one backward asks for the gradient of one of them (or two): each is the
    peer's, with or without a bias (whose absence moves the targets to the node's third input)."""
    for bias in (True, False):
        features, weight, b, targets = _leaves(events, 5, 11, torch.float64, bias)
        leaves = [t for t in (features, weight, b) if t is not None]
        loss, expected = linear_cross_entropy(*leaves[:2], b, targets), peer(features, weight, b, targets)
        subsets = [[leaf] for leaf in leaves] + [[features, leaves[-1]]]
        for subset in subsets:
            got = torch.autograd.grad(loss * 1.5, subset, retain_graph=True)
            want = torch.autograd.grad(expected * 1.5, subset, retain_graph=True)
            for one, other in zip(got, want):
                torch.testing.assert_close(one, other, **TOL[torch.float64])


def test_bad_input_is_a_clear_error():
    features, weight, b, targets = _leaves(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(classes, 3\)"):
        linear_cross_entropy(features, weight[:, :2], b, targets)
    with pytest.raises(ValueError, match=r"bias must be \(5,\)"):
        linear_cross_entropy(features, weight, b[:4], targets)
    with pytest.raises(ValueError, match="1-D int64"):
        linear_cross_entropy(features, weight, b, targets.int())
    with pytest.raises(ValueError, match="one class id per row"):
        linear_cross_entropy(features, weight, b, targets[:3])
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        linear_cross_entropy(features, weight, b.tolist(), targets)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        linear_cross_entropy(features, weight, b[None], targets)


# Rows a caller might mean to skip (-100 is F.cross_entropy's default ignore_index) and ids past the catalogue.
BAD_TARGETS = {"ignore_index": ([0, -100, 4, 2], r"\[-100, 4\] \(there is no ignore_index"),
               "negative": ([0, -1, 1, 2], r"\[-1, 2\]"), "past the end": ([0, 1, 5, 2], r"\[0, 5\]\Z"),
               "huge": ([2 ** 40, 0, 1, 2], r"\[0, 1099511627776\]")}


@pytest.mark.parametrize("targets,message", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
@pytest.mark.parametrize("backend,dtype,autocast", [
    ("cpu", torch.float32, False), ("reference", torch.float32, False), ("reference", torch.float64, False),
    # auto on what the cpu kernel takes, and on what only the reference takes (half types, autocast).
    (None, torch.float32, False), (None, torch.bfloat16, False), (None, torch.float32, True)])
def test_targets_outside_the_classes_are_the_same_error_on_every_backend(targets, message, backend, dtype,
                                                                         autocast):
    # The reference composition, F.cross_entropy, would silently drop the rows marked -100 (its
    # ignore_index) where the cpu kernel refuses them: the same call must not give a loss on one backend and
    # an error on another.
    features, weight, b, _ = _leaves(4, 3, 5, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\), got values in " + message):
            linear_cross_entropy(features, weight, b, torch.tensor(targets), backend=backend)


def test_row_op_checks_targets_itself():
    logits, bias = rand(4, 5, dtype=torch.float32), rand(5, dtype=torch.float32)
    for targets in ([0, -100, 4, 2], [0, 1, 5, 2]):
        with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 5\)"):
            _row_op(logits, torch.tensor(targets), bias)


def test_backends_it_lacks_are_an_error_never_a_silent_fallback():
    from hiertcn_fast.backends import BackendUnavailableError
    features, weight, b, targets = _leaves(4, 3, 5, torch.float32)
    for name in ("cuda", "triton"):
        with pytest.raises(BackendUnavailableError, match=f"no {name} backend"):
            linear_cross_entropy(features, weight, b, targets, backend=name)
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' cannot run this call: it takes float32 or float64"):
        linear_cross_entropy(features.bfloat16(), weight.bfloat16(), b.bfloat16(), targets, backend="cpu")
    # auto takes the reference composition where the kernel cannot run (half types here), with its result.
    half = [t.detach().bfloat16() for t in (features, weight, b)]
    torch.testing.assert_close(linear_cross_entropy(*half, targets), linear_cross_entropy_reference(*half, targets))


@pytest.mark.parametrize("dtype, shift", [(torch.float64, 1e17), (torch.float32, 1e8), (torch.float32, 2.0 ** 24),
                                          (torch.float32, 1e5)])
def test_the_loss_of_logits_with_a_large_common_shift_is_the_reference_loss(dtype, shift):
    """The softmax is shift invariant: 7 equal logits cost log(7) per row whatever their value, which the reference
    (F.cross_entropy) gives. The cpu kernel computed (max + log(sum)) - z[target], where a large max rounds log(sum)
    away: 0 in float64 at 1e17 and in float32 at 1e8, 6.0 at 2**24. It now takes torch's order,
    log(sum) - (z[target] - max). (The gradient, from the softmax, was right.)"""
    features, weight = torch.zeros(3, 2, dtype=dtype), torch.zeros(7, 2, dtype=dtype)
    bias = torch.full((7,), shift, dtype=dtype)
    targets = torch.tensor([0, 3, 6])
    reference = linear_cross_entropy(features, weight, bias, targets, backend="reference")
    assert reference.item() == pytest.approx(3 * math.log(7), rel=1e-6)
    torch.testing.assert_close(linear_cross_entropy(features, weight, bias, targets, backend="cpu"), reference)


# ---- inside torch.func transforms ----------------------------------------------------------------------------

def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 4, generator=g)
    weight = torch.randn(7, 4, generator=g)
    bias = torch.randn(7, generator=g)
    targets = torch.randint(0, 7, (5,), generator=g)
    return features, weight, bias, targets


def test_linear_cross_entropy_auto_runs_the_reference_under_torch_func_grad():
    """README, Backends: "Inside a torch.func transform (grad, vjp, jacrev, vmap: per-sample gradients, MAML)
    `auto` picks `reference`, whose plain PyTorch the transforms see through", for this op too: its auto choice
    ran the cpu kernel's autograd.Function, which torch.func refuses ("must override the setup_context
    staticmethod")."""
    features, weight, bias, targets = _loss_inputs()
    grad = torch.func.grad(lambda w: linear_cross_entropy(features, w, bias, targets))(weight)
    expected = torch.func.grad(lambda w: linear_cross_entropy_reference(features, w, bias, targets))(weight)
    torch.testing.assert_close(grad, expected)


def test_linear_cross_entropy_per_sample_gradients_under_vmap():
    """README, Backends: per-sample gradients (vmap of grad) work with auto, which picks the reference there; the
    targets' range check reads the values under the transform's wrappers (it failed: "Cannot access data pointer
    of Tensor that doesn't have storage"), and still refuses a target out of range."""
    features, weight, bias, targets = _loss_inputs()

    def one(f, t):
        return linear_cross_entropy(f[None], weight, bias, t[None])

    per_sample = torch.func.vmap(torch.func.grad(one))(features, targets)
    expected = torch.stack([torch.func.grad(lambda f: linear_cross_entropy_reference(f[None], weight, bias, t[None]))(
        f) for f, t in zip(features, targets)])
    torch.testing.assert_close(per_sample, expected)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\)"):
        torch.func.vmap(torch.func.grad(one))(features, torch.tensor([1, 2, 3, 9, 0]))


def test_linear_cross_entropy_named_cpu_backend_under_torch_func_is_backend_unavailable():
    """README, Backends: "A backend asked for by name that cannot run the call raises BackendUnavailableError saying
    why": backend='cpu' inside torch.func.grad (as causal_conv1d does) instead of torch's internal RuntimeError."""
    from hiertcn_fast import BackendUnavailableError

    features, weight, bias, targets = _loss_inputs()
    with pytest.raises(BackendUnavailableError, match="torch.func transforms"):
        torch.func.grad(lambda w: linear_cross_entropy(features, w, bias, targets, backend="cpu"))(weight)
