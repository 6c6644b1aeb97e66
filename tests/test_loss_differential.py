"""Differential fuzzing of the training losses against independent peers.

linear_cross_entropy (backends cpu, reference and auto) against torch's own composition
F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum"): values and every gradient over random
shapes (classes around the cpu path's block sizes), float32/float64, bias None, non-contiguous and expanded views,
targets at the extremes, large-magnitude and non-finite logits, gradients asked of some inputs only, autocast,
torch.compile and activation checkpointing; bad input.

sampled_softmax_loss against a slow per-event recomputation for a fixed sample (duplicates and accidental hits
included), the exact expectation of its partition-sum estimate over every possible draw (the "estimates the full
one" claim), the Trainer's proposals and seeded draws, and bad input.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.ops import linear_cross_entropy
import hiertcn_fast.ops.loss as loss_module
from hiertcn_fast.train import (Trainer, TrainConfig, build_model, sampled_softmax_loss, train_item_counts)


def peer(features, weight, bias, targets):
    return F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum")


def _grads(loss, leaves):
    if not leaves:
        return ()
    return torch.autograd.grad(loss, leaves)


# ---------------------------------------------------------------------------------------------------------------
# linear_cross_entropy: random differential fuzz
# ---------------------------------------------------------------------------------------------------------------

# Classes around the cpu path's block-size arithmetic (8 MiB / (classes * element size), clamped to [256, 1024] rows):
# float64 crosses 256 rows at 4096 classes, float32 at 8192; the row kernel's 16-lane reductions at 16.
_SPECIAL_CLASSES = [1, 2, 15, 16, 17, 31, 33, 255, 256, 257, 1023, 1024, 1025, 2047, 2049, 4095, 4096, 4097, 5000]


def _make_view(t, how, generator):
    """The same values as ``t`` through a non-contiguous (or expanded) view."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":
        wide = torch.randn(t.shape[0], t.shape[1] * 2 + 3, dtype=t.dtype, generator=generator)
        wide[:, 1:2 * t.shape[1] + 1:2] = t
        return wide[:, 1:2 * t.shape[1] + 1:2]
    if how == "rows":
        wide = torch.randn(t.shape[0] * 2 + 1, t.shape[1], dtype=t.dtype, generator=generator)
        wide[1::2] = t
        return wide[1::2]
    return t


def _fuzz_case(seed):
    g = torch.Generator().manual_seed(seed)
    r = np.random.default_rng(seed)
    dtype = torch.float64 if r.random() < 0.5 else torch.float32
    events = int(r.choice([1, 2, 3, 7, 64, 255, 256, 257, 300, int(r.integers(1, 301))]))
    classes = int(r.choice(_SPECIAL_CLASSES + [int(r.integers(1, 5001))]))
    if classes * events > 400_000:  # keep the file fast: the long catalogues with fewer rows (but > 1 block in f64)
        events = min(events, 300 if classes > 4096 and dtype == torch.float64 else 80)
    dim = int(r.integers(1, 71))
    scale = float(r.choice([1.0, 1.0, 5.0, 1e3]))
    with_bias = r.random() < 0.7
    features = torch.randn(events, dim, dtype=dtype, generator=g) * scale
    weight = torch.randn(classes, dim, dtype=dtype, generator=g) * dim ** -0.5
    bias = torch.randn(classes, dtype=dtype, generator=g) if with_bias else None
    targets = torch.randint(0, classes, (events,), generator=g)
    targets[0] = classes - 1
    if events > 1:
        targets[1] = 0
    features = _make_view(features, str(r.choice(["none", "transposed", "sliced", "rows"])), g)
    weight = _make_view(weight, str(r.choice(["none", "transposed", "sliced", "rows"])), g)
    if bias is not None and r.random() < 0.3:
        bias = torch.stack([bias, torch.zeros_like(bias)], 1)[:, 0]  # strided bias
    needs = [bool(x) for x in r.random(3) < 0.7]
    for t, need in zip((features, weight, bias), needs):
        if t is not None:
            t.requires_grad_(need)
    return dtype, scale, features, weight, bias, targets


@pytest.mark.parametrize("seed", range(36))
def test_fuzz_matches_torch_composition(seed):
    dtype, scale, features, weight, bias, targets = _fuzz_case(seed)
    leaves = [t for t in (features, weight, bias) if t is not None and t.requires_grad]
    expected = peer(features, weight, bias, targets)
    wanted = _grads(expected * 0.7, leaves)
    magnitude = max(1.0, scale)
    tol = (dict(rtol=1e-9, atol=1e-9 * magnitude) if dtype == torch.float64
           else dict(rtol=3e-5, atol=3e-5 * magnitude))
    for backend in ("cpu", "reference", None):
        loss = linear_cross_entropy(features, weight, bias, targets, backend=backend)
        assert loss.dtype == dtype and loss.dim() == 0
        assert loss.requires_grad == bool(leaves)
        torch.testing.assert_close(loss, expected.detach() if not leaves else expected,
                                   rtol=tol["rtol"], atol=tol["atol"] * max(1, targets.numel()) ** 0.5)
        for got, want in zip(_grads(loss * 0.7, leaves), wanted):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_more_than_one_block_of_rows_with_a_long_catalogue(dtype):
    """5,000 classes in float64: 256-row blocks (8 MiB / 40,000 bytes < 256), so 300 events make a full and a
    partial block; float32 with the block size forced down the same way."""
    g = torch.Generator().manual_seed(11)
    classes, events, dim = 5000, 300, 9
    assert loss_module._block_rows(classes, 8) == 256
    features = torch.randn(events, dim, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(classes, dim, dtype=dtype, generator=g) / 3).requires_grad_()
    bias = torch.randn(classes, dtype=dtype, generator=g).requires_grad_()
    targets = torch.randint(0, classes, (events,), generator=g)
    targets[255], targets[256], targets[-1] = classes - 1, 0, classes - 1
    expected = peer(features, weight, bias, targets)
    loss = linear_cross_entropy(features, weight, bias, targets, backend="cpu")
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(loss, expected, **tol)
    for got, want in zip(torch.autograd.grad(loss, [features, weight, bias]),
                         torch.autograd.grad(expected, [features, weight, bias])):
        torch.testing.assert_close(got, want, **tol)


def test_expanded_and_shared_inputs():
    """Stride-0 (expanded) features, and one tensor used as both features and weight (tied): the gradients add
    up through the views as torch's do."""
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, 6, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(9, 6, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.tensor([0, 8, 3, 3, 8])
    for backend in ("cpu", "reference"):
        loss = linear_cross_entropy(row.expand(5, 6), weight, None, targets, backend=backend)
        expected = peer(row.expand(5, 6), weight, None, targets)
        torch.testing.assert_close(loss, expected)
        for got, want in zip(torch.autograd.grad(loss, [row, weight]), torch.autograd.grad(expected, [row, weight])):
            torch.testing.assert_close(got, want)
    tied = torch.randn(7, 4, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    loss = linear_cross_entropy(tied, tied, None, targets, backend="cpu")
    expected = peer(tied, tied, None, targets)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, tied)[0], torch.autograd.grad(expected, tied)[0])


def test_zero_feature_dim_and_single_class():
    """dim 0 (the logits are the bias alone) and one class (a zero loss and zero gradients)."""
    for dtype in (torch.float32, torch.float64):
        features = torch.randn(4, 0, dtype=dtype, requires_grad=True)
        weight = torch.randn(6, 0, dtype=dtype, requires_grad=True)
        bias = torch.randn(6, dtype=dtype, requires_grad=True)
        targets = torch.tensor([0, 5, 2, 2])
        loss = linear_cross_entropy(features, weight, bias, targets, backend="cpu")
        expected = peer(features, weight, bias, targets)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, bias)[0], torch.autograd.grad(expected, bias)[0])
        features = torch.randn(5, 3, dtype=dtype, requires_grad=True)
        weight = torch.randn(1, 3, dtype=dtype, requires_grad=True)
        loss = linear_cross_entropy(features, weight, None, torch.zeros(5, dtype=torch.long), backend="cpu")
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(grad) == 0 for grad in torch.autograd.grad(loss, [features, weight]))


# ---------------------------------------------------------------------------------------------------------------
# non-finite and large logits: the same as torch's
# ---------------------------------------------------------------------------------------------------------------

def _non_finite_cases(dtype):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(5, 3, dtype=dtype, generator=g)
    weight = torch.randn(7, 3, dtype=dtype, generator=g)
    bias = torch.randn(7, dtype=dtype, generator=g)
    targets = torch.tensor([0, 6, 3, 3, 1])
    cases = {}
    b = bias.clone(); b[2] = -math.inf
    cases["-inf bias, not a target"] = (features, weight, b)
    b = bias.clone(); b[3] = -math.inf
    cases["-inf bias of a target"] = (features, weight, b)
    cases["all -inf"] = (features, weight, torch.full_like(bias, -math.inf))
    b = bias.clone(); b[2] = math.inf
    cases["+inf bias"] = (features, weight, b)
    b = bias.clone(); b[0] = math.nan
    cases["NaN bias"] = (features, weight, b)
    f = features.clone(); f[1, 1] = math.nan
    cases["NaN feature"] = (f, weight, bias)
    return cases, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_inputs_behave_as_torch(dtype):
    cases, targets = _non_finite_cases(dtype)
    for name, tensors in cases.items():
        leaves = [t.clone().requires_grad_() for t in tensors]
        expected = peer(*leaves, targets)
        wanted = torch.autograd.grad(expected, leaves)
        for backend in ("cpu", "reference"):
            loss = linear_cross_entropy(*leaves, targets, backend=backend)
            torch.testing.assert_close(loss, expected, equal_nan=True, msg=f"{name} {backend}: loss")
            for got, want, what in zip(torch.autograd.grad(loss, leaves), wanted, ("features", "weight", "bias")):
                assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name} {backend}: NaNs of grad {what}"
                torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {backend}: grad {what}")


# The float32 cpu kernel's exp (exp_poly, written for the GRU gates) clamps its argument to [-80, 80], so in the
# softmax exp(-inf) was e^-80 ~ 1.8e-35, not 0: a class masked with a -inf logit kept a nonzero probability and
# gradient (torch: exactly 0), and a -inf logit that came from an infinite weight gave an inf feature gradient where
# torch gives NaN (0 * inf). (float64 uses libm's exp and matched torch.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_class_masked_with_minus_inf_gets_exactly_zero_probability(dtype):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(5, 3, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(7, 3, dtype=dtype, generator=g).requires_grad_()
    bias = torch.randn(7, dtype=dtype, generator=g)
    bias[2] = -math.inf
    bias.requires_grad_()
    targets = torch.tensor([0, 6, 3, 3, 1])
    expected_grads = torch.autograd.grad(peer(features, weight, bias, targets), [weight, bias])
    assert expected_grads[1][2].item() == 0.0 and torch.count_nonzero(expected_grads[0][2]) == 0
    grad_weight, grad_bias = torch.autograd.grad(linear_cross_entropy(features, weight, bias, targets, backend="cpu"),
                                                 [weight, bias])
    assert grad_bias[2].item() == 0.0, f"masked class: grad bias {grad_bias[2].item()} (torch: 0)"
    assert torch.count_nonzero(grad_weight[2]) == 0, f"masked class: grad weight {grad_weight[2].tolist()} (torch: 0)"
    # A -inf logit from an infinite weight entry: torch's feature gradient is NaN there (0 * inf).
    w = weight.detach().clone()
    w[4, 0] = math.inf
    f = features.detach().clone()
    f[:, 0] = -f[:, 0].abs()  # every row's logit of class 4 is -inf
    f.requires_grad_()
    got = torch.autograd.grad(linear_cross_entropy(f, w, bias.detach(), targets, backend="cpu"), f)[0]
    want = torch.autograd.grad(peer(f, w, bias.detach(), targets), f)[0]
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (f"feature gradient {got[:, 0].tolist()}, torch's "
                                                              f"{want[:, 0].tolist()}")


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e3), (torch.float32, 1e4), (torch.float64, 1e6)])
def test_large_magnitude_logits_are_finite_and_match(dtype, scale):
    g = torch.Generator().manual_seed(9)
    features = (torch.randn(40, 8, dtype=dtype, generator=g) * scale).requires_grad_()
    weight = torch.randn(300, 8, dtype=dtype, generator=g).requires_grad_()
    bias = torch.randn(300, dtype=dtype, generator=g).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)
    expected = peer(features, weight, bias, targets)
    loss = linear_cross_entropy(features, weight, bias, targets, backend="cpu")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    for got, want in zip(torch.autograd.grad(loss, [features, weight, bias]),
                         torch.autograd.grad(expected, [features, weight, bias])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------------------
# autocast, torch.compile, checkpointing, double backward
# ---------------------------------------------------------------------------------------------------------------

def test_cpu_autocast_bfloat16_follows_f_linear():
    """README: under autocast linear_cross_entropy follows F.linear (product in bf16, softmax in float32); float64
    inputs, which autocast leaves alone, run the cpu kernel in float64."""
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        leaves = [(torch.randn(*shape, dtype=dtype, generator=g)).requires_grad_()
                  for shape in ((17, 6), (23, 6), (23,))]
        targets = torch.randint(0, 23, (17,), generator=g)
        targets[0] = 22
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(*leaves, targets)
            expected = peer(*leaves, targets)
        assert loss.dtype == expected.dtype == (torch.float32 if dtype == torch.float32 else torch.float64)
        torch.testing.assert_close(loss, expected)
        for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
            assert got.dtype == want.dtype == dtype
            torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def compiled_loss():
    torch._dynamo.reset()
    return torch.compile(lambda f, w, b, t: linear_cross_entropy(f, w, b, t), fullgraph=True)


def _compile_inputs():
    g = torch.Generator().manual_seed(21)
    features = torch.randn(9, 5, generator=g).requires_grad_()
    weight = torch.randn(11, 5, generator=g).requires_grad_()
    bias = torch.randn(11, generator=g).requires_grad_()
    targets = torch.randint(0, 11, (9,), generator=g)
    return features, weight, bias, targets


def test_compile_fullgraph_matches_torch(compiled_loss):
    features, weight, bias, targets = _compile_inputs()
    loss = compiled_loss(features, weight, bias, targets)
    expected = peer(features, weight, bias, targets)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, [features, weight, bias]),
                         torch.autograd.grad(expected, [features, weight, bias])):
        torch.testing.assert_close(got, want)


# Under torch.compile the range check was skipped, and the reference composition silently dropped a row marked -100
# (F.cross_entropy's ignore_index): the compiled loss was the loss of the other rows, the eager call a ValueError.
# The graph now asserts the range.
def test_compile_refuses_an_ignore_index_target_like_eager(compiled_loss):
    features, weight, bias, targets = _compile_inputs()
    targets = targets.clone()
    targets[0] = -100
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 11\)"):
        linear_cross_entropy(features, weight, bias, targets)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 11\)"):
        compiled_loss(features, weight, bias, targets)


def test_non_reentrant_checkpoint_gives_torch_gradients():
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_() for s in ((12, 5), (30, 5), (30,))]
    targets = torch.randint(0, 30, (12,), generator=g)
    loss = checkpoint(lambda f, w, b: linear_cross_entropy(f, w, b, targets, backend="cpu"), *leaves,
                      use_reentrant=False)
    expected = peer(*leaves, targets)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss * 3.0, leaves), torch.autograd.grad(expected * 3.0, leaves)):
        torch.testing.assert_close(got, want)


def test_double_backward_is_refused_on_cpu_and_right_on_reference():
    g = torch.Generator().manual_seed(8)
    leaves = [torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_() for s in ((4, 3), (6, 3), (6,))]
    targets = torch.tensor([0, 5, 5, 2])
    loss = linear_cross_entropy(*leaves, targets, backend="cpu")
    with pytest.raises(RuntimeError, match="once differentiable"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    reference = linear_cross_entropy(*leaves, targets, backend="reference")
    hvp = torch.autograd.grad(torch.autograd.grad(reference, leaves[0], create_graph=True)[0].sum(), leaves)
    want = torch.autograd.grad(torch.autograd.grad(peer(*leaves, targets), leaves[0], create_graph=True)[0].sum(),
                               leaves)
    for got, w in zip(hvp, want):
        torch.testing.assert_close(got, w)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------

def _good():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, generator=g),
            torch.tensor([0, 4, 2, 2]))


BAD = {
    "int features": (lambda f, w, b, t: (f.long(), w, b, t), TypeError, "features"),
    "1-D features": (lambda f, w, b, t: (f[0], w, b, t), ValueError, "features must be 2-D"),
    "3-D weight": (lambda f, w, b, t: (f, w[None], b, t), ValueError, "weight must be 2-D"),
    "weight of another dim": (lambda f, w, b, t: (f, w[:, :2], b, t), ValueError, r"weight must be \(classes, 3\)"),
    "weight of another dtype": (lambda f, w, b, t: (f, w.double(), b, t), TypeError, "weight has dtype"),
    "bias of another dtype": (lambda f, w, b, t: (f, w, b.double(), t), TypeError, "bias has dtype"),
    "bias of another length": (lambda f, w, b, t: (f, w, b[:4], t), ValueError, r"bias must be \(5,\)"),
    "weight on meta": (lambda f, w, b, t: (f, w.to("meta"), b, t), ValueError, "weight is on meta"),
    "int32 targets": (lambda f, w, b, t: (f, w, b, t.int()), ValueError, "1-D int64"),
    "float targets": (lambda f, w, b, t: (f, w, b, t.float()), ValueError, "1-D int64"),
    "2-D targets": (lambda f, w, b, t: (f, w, b, t[None]), ValueError, "1-D int64"),
    "list targets": (lambda f, w, b, t: (f, w, b, t.tolist()), ValueError, "1-D int64"),
    "short targets": (lambda f, w, b, t: (f, w, b, t[:3]), ValueError, "one class id per row"),
    "target = classes": (lambda f, w, b, t: (f, w, b, torch.tensor([0, 5, 1, 1])), ValueError, r"\[0, 5\)"),
    "target -1": (lambda f, w, b, t: (f, w, b, torch.tensor([0, -1, 1, 1])), ValueError, r"\[0, 5\)"),
    "rows but no classes": (lambda f, w, b, t: (f, w[:0], None, t), ValueError, r"\[0, 0\)"),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_clear_error(case, backend):
    make, error, message = case
    with pytest.raises(error, match=message):
        linear_cross_entropy(*make(*_good()), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_empty_batch_is_a_zero_loss(backend):
    f, w, b, _ = _good()
    leaves = [f[:0].clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    loss = linear_cross_entropy(*leaves, torch.zeros(0, dtype=torch.long), backend=backend)
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# sampled softmax with log-q correction
# ---------------------------------------------------------------------------------------------------------------

class _Output(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


def _slow_sampled_loss(features, targets, weight, bias, sampled, log_q):
    """Per event, in float64: the target's logit as it is, then every sampled item that is not the target, its
    logit minus log_q; loss = logsumexp(those) - target's logit."""
    total = features.new_zeros((), dtype=torch.float64)
    for i in range(features.shape[0]):
        def logit(j):
            z = (features[i].double() * weight[j].double()).sum()
            return z + (0.0 if bias is None else bias[j].double())
        t = int(targets[i])
        terms = [logit(t)] + [logit(int(j)) - log_q[int(j)].double() for j in sampled if int(j) != t]
        total = total + torch.logsumexp(torch.stack(terms), 0) - terms[0]
    return total


@pytest.mark.parametrize("dtype,with_bias", [(torch.float64, True), (torch.float64, False), (torch.float32, True)])
def test_sampled_loss_matches_a_slow_recomputation(dtype, with_bias):
    g = torch.Generator().manual_seed(13)
    items, dim, events = 15, 4, 9
    features = torch.randn(events, dim, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(items, dim, dtype=dtype, generator=g).requires_grad_()
    bias = torch.randn(items, dtype=dtype, generator=g).requires_grad_() if with_bias else None
    targets = torch.tensor([1, 14, 3, 3, 7, 1, 9, 14, 2])
    sampled = torch.tensor([3, 3, 5, 14, 8, 1, 11, 3, 12])  # duplicates and accidental hits
    log_q = torch.log(len(sampled) * torch.softmax(torch.randn(items, generator=g), 0))
    leaves = [t for t in (features, weight, bias) if t is not None]
    loss = sampled_softmax_loss(features, targets, _Output(weight, bias), sampled, log_q)
    expected = _slow_sampled_loss(features, targets, weight, bias, sampled, log_q)
    assert loss.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected, **tol)
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got.double(), want.double(), **tol)


def test_sampled_loss_when_every_draw_is_the_target_is_zero():
    features = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    output = torch.nn.Linear(3, 6, dtype=torch.float64)
    loss = sampled_softmax_loss(features, torch.tensor([4, 4]), output, torch.tensor([4, 4, 4]),
                                torch.zeros(6, dtype=torch.float64))
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, features)[0]) == 0


def _expected_partition(features, target, output, proposal, num_sampled, log_q):
    """E over every possible draw (with replacement, ``num_sampled`` of them, from ``proposal``) of the sampled
    loss's partition sum, exp(loss + target's logit), computed exactly by enumeration."""
    support = torch.nonzero(proposal > 0)[:, 0].tolist()
    logit_t = float(output(features)[0, int(target)])
    expectation = 0.0
    for draw in itertools.product(support, repeat=num_sampled):
        probability = math.prod(float(proposal[j]) for j in draw)
        loss = sampled_softmax_loss(features, target, output, torch.tensor(draw), log_q)
        expectation += probability * math.exp(float(loss) + logit_t)
    return expectation


@pytest.mark.parametrize("num_sampled", [1, 2])
def test_sampled_partition_sum_is_unbiased_for_a_positive_proposal(num_sampled):
    """Docstring: "The partition sum then estimates the full one, the target's term exactly": with every item's
    q > 0 its expectation over the draws is the full partition sum over items 1.. (id 0 has q = 0 and is no class)."""
    g = torch.Generator().manual_seed(17)
    items = 7
    output = torch.nn.Linear(3, items + 1, dtype=torch.float64)
    features = torch.randn(1, 3, dtype=torch.float64, generator=g)
    proposal = torch.rand(items + 1, dtype=torch.float64, generator=g) + 0.1
    proposal[0] = 0.0
    proposal /= proposal.sum()
    log_q = torch.log(num_sampled * proposal.clamp(min=1e-30))
    with torch.no_grad():
        full = float(torch.logsumexp(output(features)[0, 1:], 0).exp())
        for target in (1, 4, items):
            expected = _expected_partition(features, torch.tensor([target]), output, proposal, num_sampled, log_q)
            assert expected == pytest.approx(full, rel=1e-10)


# ---- the Trainer's proposals ----

@pytest.fixture(scope="module")
def cache_with_unseen_items(tmp_path_factory):
    """A synthetic cache (cold split) in which some catalogue items never occur in the training split."""
    from model_helpers import synthetic_cache

    cache = synthetic_cache(tmp_path_factory.mktemp("fuzz_loss") / "cache", num_events=3000, num_items=300, seed=3)
    counts = train_item_counts(cache)
    assert counts[0] == 0 and (counts[1:] == 0).sum() > 0
    return cache


def _trainer(cache, sampler, num_sampled=1, seed=0):
    model = build_model("session_gru", cache.num_items, seed=1, embedding_dim=8, hidden=8)
    config = TrainConfig(epochs=1, lanes=4, sessions_per_batch=2, loss="sampled", num_sampled=num_sampled,
                         sampler=sampler, seed=seed, num_producers=0, device="cpu")
    return Trainer(model, cache, config, out=None)


def _trainer_expectation_gap(trainer, cache):
    """|E[partition estimate] - full partition| / full, for one event of a random feature vector, computed exactly
    over the Trainer's proposal with num_sampled = 1 (E = sum_j q_j * estimate(j))."""
    output = trainer.model.output
    log_q = trainer.loss_step.log_q
    proposal = trainer.proposal.double()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, output.in_features, generator=g) * 3
    counts = train_item_counts(cache)
    target = torch.tensor([int(np.flatnonzero(counts)[-1])])
    support = torch.nonzero(proposal > 0)[:, 0]
    with torch.no_grad():
        logits = output(features)[0].double()
        full = float(logits[1:].exp().sum())
        # every support item drawn alone (num_sampled = 1): one loss per draw, batched as events of one draw each
        estimates = torch.stack([sampled_softmax_loss(features, target, output, j[None], log_q) for j in support])
        expectation = float((proposal[support] * (estimates.double() + logits[target]).exp()).sum())
    return abs(expectation - full) / full


def test_trainer_uniform_proposal_gives_an_unbiased_partition_sum(cache_with_unseen_items):
    trainer = _trainer(cache_with_unseen_items, "uniform")
    assert float(trainer.proposal[0]) == 0.0 and bool((trainer.proposal[1:] > 0).all())
    assert _trainer_expectation_gap(trainer, cache_with_unseen_items) < 1e-5


# The unigram proposal (train counts ** 0.75) gave q = 0 to catalogue items that never occur in the training split,
# so they were never drawn: the sampled partition sum did not estimate the full one (it missed their exp(logit)), and
# their output rows never got the negative gradient the full softmax gives them. It is now (counts + 1) ** 0.75.
def test_trainer_unigram_proposal_gives_an_unbiased_partition_sum(cache_with_unseen_items):
    trainer = _trainer(cache_with_unseen_items, "unigram")
    unseen = int((trainer.proposal[1:] == 0).sum())
    gap = _trainer_expectation_gap(trainer, cache_with_unseen_items)
    assert gap < 1e-5, (f"{unseen} catalogue items have q = 0 under the unigram proposal: the expected sampled "
                        f"partition sum misses {gap:.1%} of the full one")


def test_trainer_draws_are_seeded_and_from_the_proposal(cache_with_unseen_items):
    cache = cache_with_unseen_items
    first = _trainer(cache, "unigram", num_sampled=4096, seed=5)
    again = _trainer(cache, "unigram", num_sampled=4096, seed=5)
    other = _trainer(cache, "unigram", num_sampled=4096, seed=6)
    draws = [first._draw_sampled() for _ in range(3)]
    assert all(torch.equal(a, again._draw_sampled()) for a in draws)
    assert not torch.equal(draws[0], other._draw_sampled())
    every = torch.cat(draws)
    assert every.dtype == torch.int64 and int(every.min()) >= 1 and int(every.max()) <= cache.num_items
    assert bool((first.proposal[every] > 0).all())
    observed = torch.bincount(every, minlength=cache.num_items + 1).double() / every.numel()
    assert float((observed - first.proposal.double()).abs().max()) < 0.02
    # log_q is log(num_sampled * q)
    support = first.proposal > 0
    torch.testing.assert_close(first.loss_step.log_q[support], torch.log(4096 * first.proposal[support]))


# ---- bad input to sampled_softmax_loss ----

def _sampled_good():
    g = torch.Generator().manual_seed(23)
    output = torch.nn.Linear(4, 10)
    return (torch.randn(3, 4, generator=g), torch.tensor([1, 9, 4]), output, torch.tensor([2, 3, 9]),
            torch.zeros(10))


def test_sampled_loss_in_range_input_and_an_empty_batch():
    features, targets, output, sampled, log_q = _sampled_good()
    assert torch.isfinite(sampled_softmax_loss(features, targets, output, sampled, log_q))
    assert sampled_softmax_loss(features[:0], targets[:0], output, sampled, log_q).item() == 0.0
    with pytest.raises(ValueError, match=r"targets must be item ids in \[0, 10\), got values in \[1, 10\]"):
        sampled_softmax_loss(features, torch.tensor([1, 10, 4]), output, sampled, log_q)


SAMPLED_BAD = {
    # an event's target -1 read the last item's row (Python's negative indexing), no error
    "target -1": (lambda f, t, o, s, q: (f, torch.tensor([1, -1, 4]), o, s, q),
                  r"targets must be item ids in \[0, 10\), got values in \[-1, 4\]"),
    # a sampled id -1 likewise became the last item
    "sampled -1": (lambda f, t, o, s, q: (f, t, o, torch.tensor([2, -1, 9]), q),
                   r"sampled must be item ids in \[0, 10\), got values in \[-1, 9\]"),
    # one row of features against three targets broadcast to three events
    "one feature row, three targets": (lambda f, t, o, s, q: (f[:1], t, o, s, q),
                                       r"targets must hold one item id per row of features \(1\), got 3"),
    # a log_q shorter than the catalogue (documented (items,)) was used as it was
    "log_q of another length": (lambda f, t, o, s, q: (f, torch.tensor([1, 2, 4]), o, torch.tensor([2, 3, 4]),
                                                      q[:5].clone()),
                                r"log_q must be \(10,\), one value per item of the output layer, got shape \(5,\)"),
    "float targets": (lambda f, t, o, s, q: (f, t.double(), o, s, q), "targets must be a 1-D int64 tensor"),
    "features of another width": (lambda f, t, o, s, q: (f[:, :3], t, o, s, q),
                                  r"features must be \(events, 4\), got shape \(3, 3\)"),
    # Session 32's audit: no sampled id gave a loss of 0 with no gradient; a drawn item's log_q of -inf or NaN gave
    # an infinite or NaN loss; an integer log_q was taken.
    "no sampled id": (lambda f, t, o, s, q: (f, t, o, s[:0], q), "sampled must hold at least one item id"),
    "log_q -inf at a drawn item": (lambda f, t, o, s, q: (f, t, o, s, q.index_fill(0, torch.tensor([3]),
                                                                                   float("-inf"))),
                                   "log_q must be finite at every sampled item; it is -inf at item 3"),
    "log_q NaN at a drawn item": (lambda f, t, o, s, q: (f, t, o, s, q.index_fill(0, torch.tensor([9]),
                                                                                  float("nan"))),
                                  "log_q must be finite at every sampled item; it is nan at item 9"),
    "integer log_q": (lambda f, t, o, s, q: (f, t, o, s, q.long()), "log_q must be a floating-point tensor"),
}


# sampled_softmax_loss (public, in hiertcn_fast.train.__all__) validated nothing: negative ids wrapped to the end of
# the catalogue, a features/targets row mismatch broadcast, and a log_q of the wrong length was accepted, each
# giving a finite loss instead of an error.
@pytest.mark.parametrize("make, message", SAMPLED_BAD.values(), ids=SAMPLED_BAD.keys())
def test_sampled_loss_bad_input_is_an_error(make, message):
    with pytest.raises(ValueError, match=message):
        sampled_softmax_loss(*make(*_sampled_good()))
