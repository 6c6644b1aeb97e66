"""Differential fuzzing of the cpu backend's compiled kernels (causal_conv1d, causal_conv1d_step with its state,
gru_cell, gru, session_update, session_update_steps) against independent plain-PyTorch peers built here
(F.conv1d on a left-padded input with the context concatenated; torch.nn.GRUCell / torch.nn.GRU with the same
weights; the masked mean + GRUCell composition), on inputs whose memory layouts stress indexing (storage offsets,
slices of wider tensors, transposed-and-back, stride-2 rows, stride-0 expansions), odd channel counts, batch 1,
time 1 and prime lengths, dilations beyond the sequence, k up to 16, hidden 1; across thread counts and repeated
runs; checking that inputs are never written and outputs never alias them; and that bad arguments are refused by
name, changing nothing."""

import contextlib
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from helpers import conv_blas
from hiertcn_fast.ops.conv import CausalConvState, causal_conv1d, causal_conv1d_step
from hiertcn_fast.ops.gru import gru, gru_cell, session_update, session_update_steps
from test_conv_ops_differential import _row_peer_last, good_conv_args

B = "cpu"
ACTS = (None, "relu", "gelu", "tanh")
ODD_CHANNELS = (1, 3, 7, 13, 129)
LAYOUTS = ("plain", "offset", "transposed", "stride2", "expand")


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=3e-4, atol=3e-4)


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---- strided leaves -------------------------------------------------------------------------------------------------

def make_leaf(shape, dtype, layout, rng, scale=1.0, requires_grad=True):
    """A leaf tensor (which owns the values and receives the gradient) and ``view``, the function that turns a
    tensor of the leaf's shape into an argument of ``shape`` with the layout's strides: 'offset' (a slice of a wider
    tensor: storage offset and strided rows), 'transposed' (stored with first and last axes swapped, transposed back),
    'stride2' (every other element of the last axis), 'expand' (stride 0 over a random axis of size > 1)."""
    shape = tuple(shape)
    if layout == "offset" and len(shape) >= 1:
        wide = (shape[0] + 2,) + tuple(s + 1 for s in shape[1:-1]) + ((shape[-1] + 3,) if len(shape) > 1 else ())
        if len(shape) == 1:
            wide = (shape[0] + 3,)
        idx = (slice(1, 1 + shape[0]),) + tuple(slice(1, 1 + s) for s in shape[1:-1]) + \
              ((slice(2, 2 + shape[-1]),) if len(shape) > 1 else ())
        leaf_shape, view = wide, (lambda t, idx=idx: t[idx])
    elif layout == "transposed" and len(shape) >= 2:
        leaf_shape = (shape[-1],) + shape[1:-1] + (shape[0],)
        view = lambda t: t.transpose(0, -1)
    elif layout == "stride2":
        leaf_shape = shape[:-1] + (2 * shape[-1],)
        view = lambda t: t[..., ::2]
    elif layout == "expand" and any(s > 1 for s in shape):
        dims = [d for d, s in enumerate(shape) if s > 1]
        d = rng.choice(dims)
        leaf_shape = shape[:d] + (1,) + shape[d + 1:]
        view = lambda t: t.expand(shape)
    else:
        leaf_shape, view = shape, (lambda t: t)
    leaf = (torch.randn(leaf_shape, dtype=torch.float64) * scale).to(dtype)
    leaf.requires_grad_(requires_grad)
    assert view(leaf).shape == shape
    return leaf, view


class Args:
    """Named arguments built from leaves and layouts; fresh copies of the same leaves for each run."""

    def __init__(self):
        self.leaves, self.views = {}, {}

    def add(self, name, shape, dtype, layout, rng, scale=1.0):
        self.leaves[name], self.views[name] = make_leaf(shape, dtype, layout, rng, scale)

    def fresh(self, dtype=None, requires_grad=True):
        leaves = {n: l.detach().clone().to(dtype or l.dtype).requires_grad_(requires_grad)
                  for n, l in self.leaves.items()}
        return leaves, {n: self.views[n](l) for n, l in leaves.items()}


def storages(ts):
    return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor) and t.numel()}


def assert_untouched(leaves, snapshot, what):
    for name, leaf in leaves.items():
        assert torch.equal(leaf.detach(), snapshot[name]), f"{what}: input {name} was modified in place"


def assert_no_alias(outputs, inputs, what):
    shared = storages(outputs) & storages(inputs)
    assert not shared, f"{what}: an output shares memory with an input"


# ---- the conv peer --------------------------------------------------------------------------------------------------

def act(v, activation):
    return {None: lambda u: u, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation](v)


def conv_peer(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None, activation=None,
              residual=None):
    batch, time, _ = x.shape
    pad = (weight.shape[2] - 1) * dilation
    if context is not None:  # concatenated to every step, the context's channels dense over the outputs
        tiled = context[:, None, :].expand(batch, time, context.shape[1])
        inp = torch.cat([x, tiled], 2).transpose(1, 2)
        if groups == 1:
            w = torch.cat([weight, context_weight], 1)
            z = F.conv1d(F.pad(inp, (pad, 0)), w, bias, dilation=dilation)
        else:
            z = F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation, groups=groups)
            z = z + F.conv1d(F.pad(tiled.transpose(1, 2), (pad, 0)), context_weight, dilation=dilation)
    else:
        z = F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation, groups=groups)
    out = act(z.transpose(1, 2), activation)
    return out if residual is None else act(out + residual, activation)


def conv_case(rng, dtype):
    batch = rng.choice([1, 1, 2, 3])
    time = rng.choice([1, 2, 3, 5, 7, 11, 13, 29])
    k = rng.choice([1, 2, 3, 5, 8, 13, 16])
    dilation = rng.choice([1, 2, 3, 5, 40, 1000])  # often beyond the sequence
    depthwise = rng.random() < 0.4
    cin = rng.choice(ODD_CHANNELS)
    if cin == 129 and (k > 5 or time > 13):  # keep the wide case cheap
        k, time = rng.choice([2, 3, 5]), rng.choice([1, 7, 13])
    groups = cin if depthwise else 1
    cout = cin * rng.choice([1, 2]) if depthwise else rng.choice(ODD_CHANNELS[:4])
    ctx = rng.choice([0, 0, 1, 3, 7])
    return dict(batch=batch, time=time, k=k, dilation=dilation, groups=groups, cin=cin, cout=cout, ctx=ctx,
                activation=rng.choice(ACTS), residual=rng.random() < 0.6, bias=rng.random() < 0.7, dtype=dtype)


def conv_args(case, rng, layouts=True):
    a = Args()
    dt, b, t, cin, cout, k, g = (case[n] for n in ("dtype", "batch", "time", "cin", "cout", "k", "groups"))
    pick = (lambda: rng.choice(LAYOUTS)) if layouts else (lambda: "plain")
    a.add("x", (b, t, cin), dt, pick(), rng)
    a.add("weight", (cout, cin // g, k), dt, pick(), rng, (cin // g * k) ** -0.5)
    if case["bias"]:
        a.add("bias", (cout,), dt, pick(), rng)
    if case["ctx"]:
        a.add("context", (b, case["ctx"]), dt, pick(), rng)
        a.add("context_weight", (cout, case["ctx"], k), dt, pick(), rng, (case["ctx"] * k) ** -0.5)
    if case["residual"]:
        a.add("residual", (b, t, cout), dt, pick(), rng)
    return a


def run_conv(fn, views, case):
    kw = {n: views[n] for n in ("bias", "context", "context_weight", "residual") if n in views}
    return fn(views["x"], views["weight"], dilation=case["dilation"], groups=case["groups"],
              activation=case["activation"], **kw)


def mine_conv(*a, **kw):
    return causal_conv1d(*a, backend=B, **kw)


def check_conv_against_peer(case, rng, layouts=True):
    a = conv_args(case, rng, layouts)
    dt = case["dtype"]
    grad_out = torch.randn(case["batch"], case["time"], case["cout"], dtype=torch.float64)
    leaves, views = a.fresh()
    snapshot = {n: l.detach().clone() for n, l in leaves.items()}
    out = run_conv(mine_conv, views, case)
    assert out.shape == (case["batch"], case["time"], case["cout"]) and out.dtype == dt
    assert_no_alias([out], leaves.values(), str(case))
    out.backward(grad_out.to(dt))
    assert_untouched(leaves, snapshot, str(case))
    p_leaves, p_views = a.fresh(torch.float64)
    expected = run_conv(conv_peer, {n: v.contiguous() for n, v in p_views.items()}, case)
    expected.backward(grad_out)
    torch.testing.assert_close(out.detach().double(), expected.detach(), **tol(dt), msg=lambda m: f"out {case}: {m}")
    with torch.no_grad():  # the forward alone (no saved pre-activations)
        _, plain_views = a.fresh(requires_grad=False)
        alone = run_conv(mine_conv, plain_views, case)
    torch.testing.assert_close(alone.double(), expected.detach(), **tol(dt), msg=lambda m: f"no_grad out {case}: {m}")
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f"no gradient for {name}: {case}"
        torch.testing.assert_close(leaf.grad.double(), p_leaves[name].grad, **tol(dt),
                                   msg=lambda m, name=name: f"grad {name} {case}: {m}")


@pytest.mark.parametrize("seed", range(8))
def test_conv_fuzz_float64_layouts_vs_conv1d_peer(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(14):
        check_conv_against_peer(conv_case(rng, torch.float64), rng)


@pytest.mark.parametrize("seed", range(4))
def test_conv_fuzz_float32_layouts_vs_conv1d_peer(seed):
    rng = random.Random(100 + seed)
    torch.manual_seed(100 + seed)
    for _ in range(12):
        check_conv_against_peer(conv_case(rng, torch.float32), rng)


@pytest.mark.parametrize("cin", ODD_CHANNELS)
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_conv_odd_channels_long_kernels_and_far_dilations(cin, depthwise):
    rng = random.Random(cin * 2 + depthwise)
    torch.manual_seed(cin)
    for time, k, dilation in ((1, 16, 1), (17, 16, 1), (13, 16, 2), (7, 4, 8), (31, 2, 30), (2, 3, 1)):
        if cin == 129 and time > 13:
            time = 13
        for activation in ACTS:
            case = dict(batch=rng.choice([1, 2]), time=time, k=k, dilation=dilation, groups=cin if depthwise else 1,
                        cin=cin, cout=cin if depthwise else rng.choice((1, 3, 7)), ctx=rng.choice([0, 3]),
                        activation=activation, residual=rng.random() < 0.5, bias=True, dtype=torch.float64)
            check_conv_against_peer(case, rng, layouts=rng.random() < 0.5)


def test_conv_identity_residual_with_strided_x():
    """residual=x (the same, strided, tensor): x's gradient collects both paths, as the peer's."""
    rng = random.Random(9)
    for layout in LAYOUTS:
        for activation in ACTS:
            for depthwise in (False, True):
                c = 7
                a = Args()
                a.add("x", (2, 11, c), torch.float64, layout, rng)
                a.add("weight", (c, 1 if depthwise else c, 5), torch.float64, rng.choice(LAYOUTS), rng, 0.4)
                grad_out = torch.randn(2, 11, c, dtype=torch.float64)
                results = []
                for fn in (mine_conv, conv_peer):
                    leaves, views = a.fresh()
                    x = views["x"] if fn is mine_conv else views["x"].contiguous()
                    w = views["weight"] if fn is mine_conv else views["weight"].contiguous()
                    out = fn(x, w, dilation=3, groups=c if depthwise else 1, activation=activation, residual=x)
                    out.backward(grad_out)
                    results.append((out.detach(), leaves["x"].grad, leaves["weight"].grad))
                for got, want in zip(*results):
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{layout} {activation}")


# ---- conv: determinism, thread counts ---------------------------------------------------------------------------

def conv_run_bits(a, case):
    leaves, views = a.fresh()
    out = run_conv(mine_conv, views, case)
    g = torch.Generator().manual_seed(3)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype))
    return [out.detach()] + [leaves[n].grad for n in sorted(leaves)]


THREAD_CONV_CASES = [
    dict(batch=3, time=97, k=4, dilation=2, groups=1, cin=13, cout=7, ctx=3, activation="gelu", residual=True,
         bias=True),
    dict(batch=2, time=61, k=16, dilation=1, groups=13, cin=13, cout=26, ctx=5, activation="tanh", residual=True,
         bias=True),
    dict(batch=1, time=257, k=3, dilation=5, groups=1, cin=3, cout=3, ctx=0, activation="relu", residual=False,
         bias=True),
    # BLAS route: dense, >= 32 channels
    dict(batch=3, time=128, k=3, dilation=2, groups=1, cin=65, cout=33, ctx=4, activation="relu", residual=True,
         bias=True),
    dict(batch=4, time=64, k=5, dilation=1, groups=129, cin=129, cout=129, ctx=0, activation=None, residual=True,
         bias=True),
]
BLAS_SIZED_CASE = 3  # the index of the dense case of >= 32 channels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index", range(len(THREAD_CONV_CASES)))
def test_conv_repeatable_bitwise_and_thread_counts_agree(dtype, index):
    _repeatable_and_thread_counts_agree(dtype, index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", ["always", "never"])
def test_blas_sized_conv_repeatable_on_both_routes(dtype, route):
    """The BLAS-sized dense case on each of the cpu conv's routes, whichever one "auto" picks on this CPU."""
    with conv_blas(route):
        _repeatable_and_thread_counts_agree(dtype, BLAS_SIZED_CASE)


def _repeatable_and_thread_counts_agree(dtype, index):
    case = dict(THREAD_CONV_CASES[index], dtype=dtype)
    rng = random.Random(index)
    torch.manual_seed(index)
    a = conv_args(case, rng)
    by_threads = {}
    for n in (1, 2):
        with threads(n):
            runs = [conv_run_bits(a, case) for _ in range(3)]
        for run in runs[1:]:
            for i, (x, y) in enumerate(zip(run, runs[0])):
                assert torch.equal(x, y), f"threads={n}: tensor {i} differs between identical runs {case}"
        by_threads[n] = runs[0]
    for i, (x, y) in enumerate(zip(by_threads[1], by_threads[2])):
        torch.testing.assert_close(x, y, **(dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64
                                            else dict(rtol=1e-5, atol=1e-5)), msg=lambda m: f"tensor {i}: {m}")
    # and the peer, once
    check_conv_against_peer(case, rng)


# ---- the step and its state -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_step_with_row_resets_vs_conv1d_peer(seed):
    rng = random.Random(500 + seed)
    torch.manual_seed(500 + seed)
    dt = rng.choice([torch.float64, torch.float32])
    batch = rng.choice([1, 2, 3, 5])
    cin = rng.choice(ODD_CHANNELS[:4] + (33,))
    depthwise = rng.random() < 0.4
    groups = cin if depthwise else 1
    cout = cin * rng.choice([1, 2]) if depthwise else rng.choice((1, 3, 7, 13))
    k = rng.choice([1, 2, 3, 7, 16])
    dilation = rng.choice([1, 2, 3, 9, 50])
    ctx = rng.choice([0, 2, 5])
    activation = rng.choice(ACTS)
    use_res, use_bias = rng.random() < 0.6, rng.random() < 0.7
    a = Args()
    a.add("weight", (cout, cin // groups, k), dt, rng.choice(LAYOUTS), rng, (cin // groups * k) ** -0.5)
    if use_bias:
        a.add("bias", (cout,), dt, rng.choice(LAYOUTS), rng)
    if ctx:
        a.add("context", (batch, ctx), dt, rng.choice(LAYOUTS), rng)
        a.add("context_weight", (cout, ctx, k), dt, rng.choice(LAYOUTS), rng, (ctx * k) ** -0.5)
    leaves, views = a.fresh(requires_grad=False)
    fixed = {n: v for n, v in views.items()}
    fixed_snapshot = {n: l.clone() for n, l in leaves.items()}
    state = CausalConvState.zeros(batch, cin, k, dilation, dtype=dt)
    sequences = [[] for _ in range(batch)]
    steps = rng.choice([7, 19, 41])
    for s in range(steps):
        if s and rng.random() < 0.25:
            chosen = sorted(rng.sample(range(batch), rng.randint(1, batch)))
            if rng.random() < 0.5:
                rows = torch.zeros(batch, dtype=torch.bool)
                rows[chosen] = True
            else:
                rows = torch.tensor(chosen)
            state.reset(rows)
            for r in chosen:
                sequences[r] = []
            for r in chosen:
                assert state.position[r] == 0 and not state.history[r].any()
        x_leaf, x_view = make_leaf((batch, cin), dt, rng.choice(LAYOUTS), rng, requires_grad=False)
        x = x_view(x_leaf)
        residual = None
        if use_res:
            r_leaf, r_view = make_leaf((batch, cout), dt, rng.choice(LAYOUTS), rng, requires_grad=False)
            residual = r_view(r_leaf)
        x_before = x_leaf.clone()
        r_before = None if residual is None else r_leaf.clone()
        positions = state.position.clone()
        out = causal_conv1d_step(x, fixed["weight"], state, fixed.get("bias"), groups=groups,
                                 context=fixed.get("context"), context_weight=fixed.get("context_weight"),
                                 activation=activation, residual=residual, backend=B)
        assert out.shape == (batch, cout) and out.dtype == dt
        assert torch.equal(x_leaf, x_before), "x was modified by the step"
        if residual is not None:
            assert torch.equal(r_leaf, r_before), "residual was modified by the step"
        assert_no_alias([out], [x_leaf, state.history, state.position, *leaves.values()]
                        + ([] if residual is None else [r_leaf]), "step")
        assert torch.equal(state.position, positions + 1)
        for r in range(batch):
            sequences[r].append(x[r].double().clone())
            want = _row_peer_last(sequences[r], fixed["weight"].double(),
                                  None if "bias" not in fixed else fixed["bias"].double(), dilation, groups,
                                  None if "context" not in fixed else fixed["context"][r].double(),
                                  None if "context_weight" not in fixed else fixed["context_weight"].double(),
                                  activation, None if residual is None else residual[r].double())
            torch.testing.assert_close(out[r].double(), want, **tol(dt),
                                       msg=lambda m: f"step {s} row {r} (k={k}, d={dilation}): {m}")
    assert_untouched(leaves, fixed_snapshot, "step")


def test_step_repeatable_and_thread_counts_agree():
    torch.manual_seed(77)
    batch, cin, cout, k, d = 9, 65, 33, 5, 3
    weight = torch.randn(cout, cin, k, dtype=torch.float64) * 0.2
    bias = torch.randn(cout, dtype=torch.float64)
    context, context_weight = torch.randn(batch, 4, dtype=torch.float64), torch.randn(cout, 4, k, dtype=torch.float64)
    xs = [torch.randn(batch, cin, dtype=torch.float64) for _ in range(20)]
    res = [torch.randn(batch, cout, dtype=torch.float64) for _ in range(20)]
    results = []
    for n in (1, 2, 2, 1):
        with threads(n):
            state = CausalConvState.zeros(batch, cin, k, d, dtype=torch.float64)
            outs = []
            for i, (x, r) in enumerate(zip(xs, res)):
                if i == 9:
                    state.reset(torch.tensor([0, 4]))
                outs.append(causal_conv1d_step(x, weight, state, bias, context=context, context_weight=context_weight,
                                               activation="gelu", residual=r, backend=B))
            results.append((torch.stack(outs), state.history.clone(), state.position.clone()))
    for i, j in ((0, 3), (1, 2)):
        for x, y in zip(results[i], results[j]):
            assert torch.equal(x, y), "the same thread count gave other bits"
    for x, y in zip(results[0], results[1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# ---- GRU peers ------------------------------------------------------------------------------------------------------

def cell_peer(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    cell = nn.GRUCell(w_ih.shape[1], w_hh.shape[1], bias=b_ih is not None, dtype=x.dtype)
    params = dict(weight_ih=w_ih, weight_hh=w_hh)
    if b_ih is not None:
        params.update(bias_ih=b_ih, bias_hh=b_hh)
    return functional_call(cell, params, (x, h))


def gru_peer(x, h0, layers):
    hidden, num_layers = layers[0][1].shape[1], len(layers)
    bias = len(layers[0]) == 4
    module = nn.GRU(x.shape[2], hidden, num_layers, bias=bias, batch_first=True, dtype=x.dtype)
    params = {}
    for l, ws in enumerate(layers):
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
        for n, w in zip(names, ws):
            params[f"{n}_l{l}"] = w.contiguous()
    return functional_call(module, params, (x, h0))


def layer_names(num_layers, bias):
    return [f"w{l}_{n}" for l in range(num_layers) for n in (["ih", "hh"] + (["bih", "bhh"] if bias else []))]


def add_gru_weights(a, input_size, hidden, num_layers, bias, dtype, rng, layouts=True):
    scale = max(hidden, 1) ** -0.5
    for l in range(num_layers):
        in_f = input_size if l == 0 else hidden
        shapes = [(3 * hidden, in_f), (3 * hidden, hidden)] + ([(3 * hidden,), (3 * hidden,)] if bias else [])
        for n, shape in zip(["ih", "hh", "bih", "bhh"], shapes):
            a.add(f"w{l}_{n}", shape, dtype, rng.choice(LAYOUTS) if layouts else "plain", rng, scale)


def gather_layers(views, num_layers, bias):
    return [[views[f"w{l}_{n}"] for n in (["ih", "hh"] + (["bih", "bhh"] if bias else []))]
            for l in range(num_layers)]


def compare_runs(a, mine_fn, peer_fn, dtype, what, no_grad_names=()):
    """mine_fn and peer_fn (float64, contiguous copies) on fresh leaves; outputs, every leaf's gradient of a random
    linear loss of all outputs, inputs unmodified, outputs not aliasing inputs."""
    leaves, views = a.fresh()
    for n in no_grad_names:
        leaves[n].requires_grad_(False)
    snapshot = {n: l.detach().clone() for n, l in leaves.items()}
    mine = mine_fn(views)
    mine = mine if isinstance(mine, tuple) else (mine,)
    assert_no_alias(mine, leaves.values(), what)
    p_leaves, p_views = a.fresh(torch.float64)
    for n in no_grad_names:
        p_leaves[n].requires_grad_(False)
    theirs = peer_fn({n: v.contiguous() for n, v in p_views.items()})
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    # The outputs' gradients as backward may hand them over: contiguous, or expanded, transposed, strided, offset.
    crng = random.Random(what)
    cots = []
    for t in theirs:
        c_leaf, c_view = make_leaf(t.shape, torch.float64, crng.choice(LAYOUTS), crng, requires_grad=False)
        cots.append(c_view(c_leaf))
    for i, (m, t) in enumerate(zip(mine, theirs)):
        assert m.dtype == dtype and m.shape == t.shape, f"{what}: output {i} {m.dtype} {tuple(m.shape)}"
        torch.testing.assert_close(m.detach().double(), t.detach(), **tol(dtype),
                                   msg=lambda msg: f"{what}: output {i}: {msg}")
    torch.autograd.backward(list(mine), [c.to(dtype) for c in cots])
    torch.autograd.backward(list(theirs), [c.contiguous() for c in cots])
    assert_untouched(leaves, snapshot, what)
    for mode in (torch.no_grad, torch.inference_mode):  # the forward alone (the kernels' scratch-only paths)
        with mode():
            _, plain_views = a.fresh(requires_grad=False)
            alone = mine_fn(plain_views)
        alone = alone if isinstance(alone, tuple) else (alone,)
        for i, (m, t) in enumerate(zip(alone, theirs)):
            torch.testing.assert_close(m.double(), t.detach(), **tol(dtype),
                                       msg=lambda msg: f"{what}: {mode.__name__} output {i}: {msg}")
    for name, leaf in leaves.items():
        if not leaf.requires_grad:
            continue
        got = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        want = torch.zeros_like(p_leaves[name]) if p_leaves[name].grad is None else p_leaves[name].grad
        torch.testing.assert_close(got.double(), want, **tol(dtype), msg=lambda msg, name=name: f"{what} grad {name}: "
                                                                                           f"{msg}")
    return mine


@pytest.mark.parametrize("seed", range(16))
def test_gru_cell_fuzz_layouts_vs_nn_grucell(seed):
    rng = random.Random(1000 + seed)
    torch.manual_seed(1000 + seed)
    dt = torch.float64 if seed % 3 else torch.float32
    batch, inp, hidden = rng.choice([1, 2, 7]), rng.choice([1, 3, 13, 129]), rng.choice([1, 3, 7, 13, 33])
    bias = rng.random() < 0.7
    a = Args()
    a.add("x", (batch, inp), dt, rng.choice(LAYOUTS), rng)
    a.add("h", (batch, hidden), dt, rng.choice(LAYOUTS), rng)
    add_gru_weights(a, inp, hidden, 1, bias, dt, rng)
    names = layer_names(1, bias)
    compare_runs(a, lambda v: gru_cell(v["x"], v["h"], *[v[n] for n in names], backend=B),
                 lambda v: cell_peer(v["x"], v["h"], *[v[n] for n in names]), dt,
                 f"cell b={batch} in={inp} hid={hidden} bias={bias}")


@pytest.mark.parametrize("seed", range(14))
def test_gru_fuzz_layouts_vs_nn_gru(seed):
    rng = random.Random(2000 + seed)
    torch.manual_seed(2000 + seed)
    dt = torch.float64 if seed % 3 else torch.float32
    batch, time = rng.choice([1, 2, 5]), rng.choice([1, 2, 3, 7, 13, 31])
    inp, hidden, num_layers = rng.choice([1, 3, 13]), rng.choice([1, 3, 7, 13]), rng.choice([1, 2, 3])
    bias = rng.random() < 0.7
    with_h0 = rng.random() < 0.8
    a = Args()
    a.add("x", (batch, time, inp), dt, rng.choice(LAYOUTS), rng)
    if with_h0:
        a.add("h0", (num_layers, batch, hidden), dt, rng.choice(LAYOUTS), rng)
    add_gru_weights(a, inp, hidden, num_layers, bias, dt, rng)

    def mine(v):
        return gru(v["x"], v.get("h0"), gather_layers(v, num_layers, bias), num_layers=num_layers, backend=B)

    def peer(v):
        h0 = v.get("h0")
        if h0 is None:
            h0 = torch.zeros(num_layers, batch, hidden, dtype=torch.float64)
        return gru_peer(v["x"], h0, gather_layers(v, num_layers, bias))

    compare_runs(a, mine, peer, dt, f"gru b={batch} t={time} in={inp} hid={hidden} L={num_layers} bias={bias}")


# ---- session_update (+ steps) peers ---------------------------------------------------------------------------------

def session_peer(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    lengths = lengths.long()
    mask = (torch.arange(items.shape[1])[None, :] < lengths[:, None]).to(items.dtype)
    mean = (items * mask[..., None]).sum(1) / lengths.clamp(min=1).to(items.dtype)[:, None]
    x = mean if proj_weight is None else F.linear(mean, proj_weight, proj_bias)
    new = []
    for l, ws in enumerate(layers):
        x = cell_peer(x, h[l], *ws)
        new.append(x)
    active = (lengths > 0)[None, :, None]
    return torch.where(active, torch.stack(new), h) * keep.to(h.dtype)[None, :, None]


INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def lengths_tensor(values, rng):
    dtype = rng.choice(INT_DTYPES)
    t = torch.tensor(values, dtype=dtype)
    kind = rng.choice(["plain", "strided", "offset"])
    if kind == "strided":  # every other element of a longer vector
        wide = torch.zeros(2 * t.numel() + 1, dtype=dtype)
        wide[1::2] = t
        t = wide[1::2]
    elif kind == "offset":  # contiguous, at a storage offset (what the kernels may read directly)
        wide = torch.full((t.numel() + 3,), 99, dtype=dtype)
        wide[2:2 + t.numel()] = t
        t = wide[2:2 + t.numel()]
    return t


def add_projection(a, proj, dim, dt, rng):
    """session_update's optional input projection ("weight": proj_weight, "both": and proj_bias) in random layouts;
    returns the GRU's input size."""
    if not proj:
        return dim
    proj_out = rng.choice([1, 4])
    a.add("pw", (proj_out, dim), dt, rng.choice(LAYOUTS), rng, dim ** -0.5)
    if proj == "both":
        a.add("pb", (proj_out,), dt, rng.choice(LAYOUTS), rng)
    return proj_out


@pytest.mark.parametrize("seed", range(16))
def test_session_update_fuzz_layouts_vs_masked_mean_grucell(seed):
    rng = random.Random(3000 + seed)
    torch.manual_seed(3000 + seed)
    dt = torch.float64 if seed % 3 else torch.float32
    batch, time, dim = rng.choice([1, 2, 5]), rng.choice([1, 2, 7, 13]), rng.choice([1, 3, 13])
    hidden, num_layers, bias = rng.choice([1, 3, 7]), rng.choice([1, 2, 3]), rng.random() < 0.7
    proj = rng.choice([None, "weight", "both"])
    keep_kind = rng.choice(["bool", "float"])
    a = Args()
    a.add("items", (batch, time, dim), dt, rng.choice(LAYOUTS), rng)
    a.add("h", (num_layers, batch, hidden), dt, rng.choice(LAYOUTS), rng)
    in_size = add_projection(a, proj, dim, dt, rng)
    if keep_kind == "float":
        a.add("keep", (batch,), dt, rng.choice(LAYOUTS), rng)
        keep_bool = None
    else:
        keep_bool = torch.tensor([rng.random() < 0.75 for _ in range(batch)])
    add_gru_weights(a, in_size, hidden, num_layers, bias, dt, rng)
    lengths = lengths_tensor([rng.randint(0, time) for _ in range(batch)], rng)
    lengths_before = lengths.clone()
    keep_before = None if keep_bool is None else keep_bool.clone()

    def mine(v):
        keep = keep_bool if keep_bool is not None else v["keep"]
        return session_update(v["items"], lengths, v["h"], keep, gather_layers(v, num_layers, bias),
                              proj_weight=v.get("pw"), proj_bias=v.get("pb"), backend=B)

    def peer(v):
        keep = keep_bool if keep_bool is not None else v["keep"]
        return session_peer(v["items"], lengths, v["h"], keep, gather_layers(v, num_layers, bias), v.get("pw"),
                            v.get("pb"))

    out = compare_runs(a, mine, peer, dt, f"session b={batch} t={time} lengths={lengths.tolist()} L={num_layers} "
                                          f"proj={proj} keep={keep_kind}")
    assert torch.equal(lengths, lengths_before) and lengths.dtype == lengths_before.dtype
    if keep_before is not None:
        assert torch.equal(keep_bool, keep_before)
        assert_no_alias(out, [keep_bool, lengths], "session_update")


@pytest.mark.parametrize("seed", range(12))
def test_session_update_steps_fuzz_layouts_vs_steps_of_the_peer(seed):
    rng = random.Random(4000 + seed)
    torch.manual_seed(4000 + seed)
    dt = torch.float64 if seed % 3 else torch.float32
    steps, batch, time, dim = rng.choice([1, 2, 5]), rng.choice([1, 2, 3]), rng.choice([1, 3, 7]), rng.choice([1, 3,
                                                                                                               13])
    hidden, num_layers, bias = rng.choice([1, 3, 7]), rng.choice([1, 2]), rng.random() < 0.7
    proj = rng.choice([None, "weight", "both"])
    keep_kind = rng.choice(["bool", "float"])
    a = Args()
    a.add("items", (steps, batch, time, dim), dt, rng.choice(LAYOUTS), rng)
    a.add("h", (num_layers, batch, hidden), dt, rng.choice(LAYOUTS), rng)
    in_size = add_projection(a, proj, dim, dt, rng)
    if keep_kind == "float":
        a.add("keep", (steps, batch), dt, rng.choice(LAYOUTS), rng)
        keep_bool = None
    else:
        keep_bool = torch.rand(steps, batch) < 0.8
    add_gru_weights(a, in_size, hidden, num_layers, bias, dt, rng)
    values = torch.randint(0, time + 1, (steps, batch))
    ldt = rng.choice(INT_DTYPES)
    lengths = values.to(ldt)
    kind = rng.choice(["plain", "transposed", "offset"])
    if kind == "transposed":
        lengths = lengths.t().contiguous().t()
    elif kind == "offset":  # contiguous at a storage offset, with out-of-range values around it
        wide = torch.full((steps + 2, batch), 99, dtype=ldt)
        wide[1:1 + steps] = lengths
        lengths = wide[1:1 + steps]
    lengths_before = lengths.clone()

    def mine(v):
        keep = keep_bool if keep_bool is not None else v["keep"]
        return session_update_steps(v["items"], lengths, v["h"], keep, gather_layers(v, num_layers, bias),
                                    proj_weight=v.get("pw"), proj_bias=v.get("pb"), backend=B)

    def peer(v):
        keep = keep_bool if keep_bool is not None else v["keep"]
        states = [v["h"]]
        for s in range(steps):
            states.append(session_peer(v["items"][s], lengths[s], states[-1], keep[s],
                                       gather_layers(v, num_layers, bias), v.get("pw"), v.get("pb")))
        return torch.stack(states)

    compare_runs(a, mine, peer, dt, f"steps s={steps} b={batch} t={time} L={num_layers} proj={proj} keep={keep_kind}")
    assert torch.equal(lengths, lengths_before)


def test_session_update_steps_output_edited_in_place_before_backward():
    """The docs: the caller may edit what session_update_steps (and session_update) returns in place before the
    backward. The gradients then are those of the edited result, as for the peer."""
    rng = random.Random(5)
    torch.manual_seed(5)
    steps, batch, time, dim, hidden, num_layers = 3, 4, 5, 3, 7, 2
    a = Args()
    a.add("items", (steps, batch, time, dim), torch.float64, "plain", rng)
    a.add("h", (num_layers, batch, hidden), torch.float64, "plain", rng)
    add_gru_weights(a, dim, hidden, num_layers, True, torch.float64, rng, layouts=False)
    lengths = torch.randint(0, time + 1, (steps, batch))
    keep = torch.ones(steps, batch, dtype=torch.bool)

    def edit(out):
        out[-1, :, 1] = 0  # zero a lane's final state
        return out

    def mine(v):
        return edit(session_update_steps(v["items"], lengths, v["h"], keep, gather_layers(v, num_layers, True),
                                         backend=B))

    def peer(v):
        states = [v["h"]]
        for s in range(steps):
            states.append(session_peer(v["items"][s], lengths[s], states[-1], keep[s],
                                       gather_layers(v, num_layers, True)))
        return edit(torch.stack(states))

    compare_runs(a, mine, peer, torch.float64, "steps edited in place")

    def mine1(v):
        out = session_update(v["items"][0], lengths[0], v["h"], keep[0], gather_layers(v, num_layers, True), backend=B)
        out[:, 2] = 0
        return out

    def peer1(v):
        out = session_peer(v["items"][0], lengths[0], v["h"], keep[0], gather_layers(v, num_layers, True))
        out[:, 2] = 0
        return out

    compare_runs(a, mine1, peer1, torch.float64, "session_update edited in place")


# ---- GRU family: determinism, thread counts ----------------------------------------------------------------------

def gru_family_bits(a, lengths, steps_lengths, keep, steps_keep, num_layers):
    leaves, v = a.fresh()
    layers = gather_layers(v, num_layers, True)
    cell = gru_cell(v["x"][:, 0], v["h0"][0], *layers[0][:1], layers[0][1], layers[0][2], layers[0][3], backend=B)
    out, hn = gru(v["x"], v["h0"], layers, num_layers=num_layers, backend=B)
    su = session_update(v["items"], lengths, v["h0"], keep, [[v["s_ih"], *layers[0][1:]], *layers[1:]], backend=B)
    st = session_update_steps(v["sitems"], steps_lengths, v["h0"], steps_keep,
                              [[v["s_ih"], *layers[0][1:]], *layers[1:]], backend=B)
    loss = (out.square().sum() + hn.sum() + cell.cos().sum() + su.square().sum() + st.sin().sum()
            + (out * v["g_out"]).sum())
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return [out.detach(), hn.detach(), cell.detach(), su.detach(), st.detach()] + [
        torch.zeros(1) if g is None else g for g in grads]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", [(3, 17, 5, 7, 2), (64, 9, 40, 65, 2), (130, 4, 33, 128, 1)], ids=str)
def test_gru_family_repeatable_bitwise_and_thread_counts_agree(dtype, sizes):
    batch, time, inp, hidden, num_layers = sizes
    rng = random.Random(batch)
    torch.manual_seed(batch)
    a = Args()
    a.add("x", (batch, time, inp), dtype, "plain", rng)
    a.add("g_out", (batch, time, hidden), dtype, "plain", rng)
    a.add("h0", (num_layers, batch, hidden), dtype, "plain", rng)
    a.add("items", (batch, 6, inp), dtype, "plain", rng)
    a.add("sitems", (3, batch, 6, inp), dtype, "plain", rng)
    a.add("s_ih", (3 * hidden, inp), dtype, "plain", rng, inp ** -0.5)
    add_gru_weights(a, inp, hidden, num_layers, True, dtype, rng, layouts=False)
    lengths = torch.randint(0, 7, (batch,))
    steps_lengths = torch.randint(0, 7, (3, batch))
    keep = torch.rand(batch) < 0.8
    steps_keep = torch.rand(3, batch, dtype=dtype)
    by_threads = {}
    for n in (1, 2):
        with threads(n):
            runs = [gru_family_bits(a, lengths, steps_lengths, keep, steps_keep, num_layers) for _ in range(3)]
        for run in runs[1:]:
            for i, (x, y) in enumerate(zip(run, runs[0])):
                assert torch.equal(x, y), f"threads={n}: tensor {i} differs between identical runs"
        by_threads[n] = runs[0]
    t = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for i, (x, y) in enumerate(zip(by_threads[1], by_threads[2])):
        torch.testing.assert_close(x, y, **t, msg=lambda m: f"tensor {i}, 1 vs 2 threads: {m}")


# ---- bad input ------------------------------------------------------------------------------------------------------

def expect_refusal(call, exc, names, watched, what):
    snapshot = [t.clone() for t in watched]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert any(n in message for n in names), f"{what}: the message does not name {names}: {message!r}"
    for t, s in zip(watched, snapshot):
        assert torch.equal(t, s), f"{what}: a refused call changed an input"


def test_causal_conv1d_bad_input_names_the_argument_and_changes_nothing():
    good = good_conv_args()
    x, weight, bias, context = good["x"], good["weight"], good["bias"], good["context"]
    context_weight, residual = good["context_weight"], good["residual"]
    cases = [
        (dict(x=x[0]), ValueError, ["x"]), (dict(x=x[None]), ValueError, ["x"]),
        (dict(weight=weight[0]), ValueError, ["weight"]), (dict(weight=weight[:, :3]), ValueError, ["weight"]),
        (dict(dilation=0), ValueError, ["dilation"]), (dict(dilation=-3), ValueError, ["dilation"]),
        (dict(dilation=2.0), TypeError, ["dilation"]), (dict(dilation=True), TypeError, ["dilation"]),
        (dict(dilation=2 ** 62), ValueError, ["dilation"]),
        (dict(dilation=np.float64(2)), TypeError, ["dilation"]),
        (dict(groups=0), ValueError, ["groups"]), (dict(groups=4), ValueError, ["groups", "weight"]),
        (dict(weight=weight.float()), TypeError, ["weight"]), (dict(x=x.float()), TypeError, ["x", "weight"]),
        (dict(bias=bias.float()), TypeError, ["bias"]), (dict(bias=bias[:4]), ValueError, ["bias"]),
        (dict(context=context.float()), TypeError, ["context"]), (dict(context=context[:1]), ValueError, ["context"]),
        (dict(context_weight=context_weight[:, :2]), ValueError, ["context_weight"]),
        (dict(context_weight=context_weight[:, :, :2]), ValueError, ["context_weight"]),
        (dict(context_weight=None), ValueError, ["context"]),
        (dict(residual=residual[:, :4]), ValueError, ["residual"]),
        (dict(residual=residual.float()), TypeError, ["residual"]),
        (dict(residual=residual.to("meta")), ValueError, ["residual"]),
        (dict(weight=weight.to("meta")), ValueError, ["weight"]),
        (dict(context=context.to("meta")), ValueError, ["context"]),
        (dict(x=x.to(torch.float16), weight=weight.half(), bias=bias.half(), context=context.half(),
              context_weight=context_weight.half(), residual=residual.half()), Exception, ["float16", "cpu"]),
        (dict(x=x.int()), TypeError, ["x"]), (dict(activation="swish"), ValueError, ["activation"]),
        (dict(x=x[:, :0], residual=residual[:, :0]), ValueError, ["x", "time"]),
    ]
    watched = [x, weight, bias, context, context_weight, residual]
    for change, exc, names in cases:
        args = {n: v for n, v in dict(good, **change).items() if v is not None}
        expect_refusal(lambda: causal_conv1d(args.pop("x"), args.pop("weight"), **args, backend=B), exc, names,
                       watched, f"{list(change)}")


def test_causal_conv1d_step_bad_input_names_the_argument_and_changes_nothing():
    dt = torch.float64
    batch = 3
    weight, bias = torch.randn(6, 4, 3, dtype=dt), torch.randn(6, dtype=dt)
    context, context_weight = torch.randn(batch, 2, dtype=dt), torch.randn(6, 2, 3, dtype=dt)
    state = CausalConvState.zeros(batch, 4, 3, 2, dtype=dt)
    for _ in range(4):
        causal_conv1d_step(torch.randn(batch, 4, dtype=dt), weight, state, bias, backend=B)
    x, residual = torch.randn(batch, 4, dtype=dt), torch.randn(batch, 6, dtype=dt)
    good = dict(x=x, weight=weight, state=state, bias=bias, context=context, context_weight=context_weight,
                residual=residual, groups=1, activation="tanh")
    cases = [
        (dict(x=x[0]), ValueError, ["x"]), (dict(x=x[:, :3]), ValueError, ["weight", "x"]),
        (dict(weight=weight.float()), TypeError, ["weight"]), (dict(x=x.float()), TypeError, ["x", "weight"]),
        (dict(bias=bias[:5]), ValueError, ["bias"]), (dict(residual=residual[:, :5]), ValueError, ["residual"]),
        (dict(residual=residual.float()), TypeError, ["residual"]),
        (dict(context=context[:2]), ValueError, ["context"]),
        (dict(weight=weight[..., :2], context_weight=context_weight[..., :2]), ValueError, ["k", "state"]),
        (dict(state=(state.history, state.position)), TypeError, ["state"]),
        (dict(x=x.clone().requires_grad_()), RuntimeError, ["x"]),
        (dict(residual=residual.clone().requires_grad_()), RuntimeError, ["residual"]),
        (dict(activation="softplus"), ValueError, ["activation"]),
    ]
    watched = [x, weight, bias, context, context_weight, residual, state.history, state.position]
    for change, exc, names in cases:
        args = dict(good, **change)
        expect_refusal(lambda: causal_conv1d_step(
            args["x"], args["weight"], args["state"], args["bias"], groups=args["groups"], context=args["context"],
            context_weight=args["context_weight"], activation=args["activation"], residual=args["residual"],
            backend=B), exc, names, watched, f"{list(change)}")
    # Bad states: position of another dtype, negative, another batch; history of another batch or dtype.
    for what, s, exc in (
            ("int32 position", CausalConvState(state.history.clone(), state.position.int(), 3, 2), ValueError),
            ("negative position", CausalConvState(state.history.clone(), torch.tensor([1, -1, 2]), 3, 2),
             (ValueError, RuntimeError)),
            ("history batch", CausalConvState(state.history[:2].clone(), state.position.clone(), 3, 2), ValueError),
            ("history dtype", CausalConvState(state.history.float(), state.position.clone(), 3, 2), TypeError),
            ("state dilation", CausalConvState(state.history.clone(), state.position.clone(), 3, 3), ValueError),
            ("expanded history", CausalConvState(state.history[:1].expand(batch, 4, 4), state.position.clone(), 3, 2),
             (ValueError, RuntimeError))):
        expect_refusal(lambda: causal_conv1d_step(x, weight, s, bias, backend=B), exc,
                       ["state", "history", "position"], [s.history, s.position, x, weight], what)


def test_gru_family_bad_input_names_the_argument_and_changes_nothing():
    dt = torch.float64
    g = random.Random(0)
    batch, time, inp, hidden = 3, 4, 5, 2
    a = Args()
    add_gru_weights(a, inp, hidden, 2, True, dt, g, layouts=False)
    _, v = a.fresh(requires_grad=False)
    layers = gather_layers(v, 2, True)
    x, h = torch.randn(batch, inp, dtype=dt), torch.randn(batch, hidden, dtype=dt)
    xs, h0 = torch.randn(batch, time, inp, dtype=dt), torch.randn(2, batch, hidden, dtype=dt)
    items = torch.randn(batch, time, inp, dtype=dt)
    lengths, keep = torch.tensor([0, 2, 4]), torch.tensor([1.0, 0.0, 1.0], dtype=dt)
    watched = [x, h, xs, h0, items, lengths, keep] + [t for layer in layers for t in layer]
    w_ih, w_hh, b_ih, b_hh = layers[0]

    def cell(**kw):
        c = {**dict(x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh), **kw}
        return lambda: gru_cell(c["x"], c["h"], c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"], backend=B)

    for call, exc, names, what in (
            (cell(x=x[None]), ValueError, ["x"], "x 3-D"),
            (cell(x=x[:2]), ValueError, ["x", "batch"], "x batch"),
            (cell(h=h.float()), TypeError, ["h", "x"], "h dtype"),
            (cell(w_ih=w_ih[:, :4]), ValueError, ["w_ih"], "w_ih shape"),
            (cell(b_hh=None), ValueError, ["b_ih", "b_hh"], "one bias"),
            (cell(w_hh=w_hh.to("meta")), ValueError, ["w_hh"], "w_hh on meta"),
    ):
        expect_refusal(call, exc, names, watched, what)

    def seq(**kw):
        c = {**dict(x=xs, h0=h0, weights=layers, num_layers=2), **kw}
        return lambda: gru(c["x"], c["h0"], c["weights"], num_layers=c["num_layers"], backend=B)

    for call, exc, names, what in (
            (seq(num_layers=2.0), TypeError, ["num_layers"], "float num_layers"),
            (seq(num_layers=True), TypeError, ["num_layers"], "bool num_layers"),
            (seq(num_layers=0), ValueError, ["num_layers"], "num_layers 0"),
            (seq(h0=h0[:, :2]), ValueError, ["h0"], "h0 batch"),
            (seq(x=xs[:, :, :4]), ValueError, ["weights[0]", "w_ih"], "x features"),
            (seq(weights=[layers[0], [layers[1][0], layers[1][1].float(), *layers[1][2:]]]), TypeError,
             ["weights[1]"], "layer 1 dtype"),
    ):
        expect_refusal(call, exc, names, watched, what)

    def su(**kw):
        c = {**dict(items=items, lengths=lengths, h=h0, keep=keep, weights=layers), **kw}
        return lambda: session_update(c["items"], c["lengths"], c["h"], c["keep"], c["weights"], backend=B)

    for call, exc, names, what in (
            (su(lengths=torch.tensor([0.0, float("nan"), 1.0])), TypeError, ["lengths"], "NaN float lengths"),
            (su(lengths=torch.tensor([0, 2, 4]).float()), TypeError, ["lengths"], "float lengths"),
            (su(lengths=torch.tensor([True, False, True])), TypeError, ["lengths"], "bool lengths"),
            (su(lengths=torch.tensor([0, 2, 5])), (ValueError, RuntimeError), ["lengths"], "length > time"),
            (su(lengths=torch.tensor([0, -1, 1], dtype=torch.int8)), (ValueError, RuntimeError), ["lengths"],
             "negative int8 length"),
            (su(lengths=torch.tensor([0, 200, 1], dtype=torch.uint8)), (ValueError, RuntimeError), ["lengths"],
             "uint8 length > time"),
            (su(lengths=torch.tensor([0, 2 ** 40, 1])), (ValueError, RuntimeError), ["lengths"], "huge length"),
            (su(lengths=[0, 2, 4]), TypeError, ["lengths"], "list lengths"),
            (su(keep=keep.float()), TypeError, ["keep"], "keep dtype"),
            (su(keep=keep[:2]), ValueError, ["keep"], "keep shape"),
            (su(items=items[:, :, :4]), ValueError, ["weights[0]", "w_ih"], "items dim"),
            (su(items=items.float()), TypeError, ["item_embeddings"], "items dtype"),
            (su(h=h0[:, :, :1]), ValueError, ["weights", "w_hh", "w_ih"], "h hidden"),
    ):
        expect_refusal(call, exc, names, watched, what)

    steps_items = torch.randn(2, batch, time, inp, dtype=dt)
    steps_lengths, steps_keep = torch.tensor([[0, 2, 4], [1, 1, 1]]), torch.ones(2, batch, dtype=dt)
    watched += [steps_items, steps_lengths, steps_keep]

    def st(**kw):
        c = {**dict(items=steps_items, lengths=steps_lengths, h=h0, keep=steps_keep, weights=layers), **kw}
        return lambda: session_update_steps(c["items"], c["lengths"], c["h"], c["keep"], c["weights"], backend=B)

    for call, exc, names, what in (
            (st(lengths=steps_lengths.double()), TypeError, ["lengths"], "float lengths"),
            (st(lengths=torch.tensor([[0, 2, 4], [1, 5, 1]])), (ValueError, RuntimeError), ["lengths"], "too long"),
            (st(lengths=torch.tensor([[0, 2, 4], [1, -5, 1]])), (ValueError, RuntimeError), ["lengths"], "negative"),
            (st(lengths=steps_lengths[:1]), ValueError, ["lengths"], "lengths steps"),
            (st(keep=steps_keep[:, :2]), ValueError, ["keep"], "keep shape"),
            (st(items=steps_items[0]), ValueError, ["item_embeddings"], "items 3-D"),
            (st(lengths=steps_lengths.bool()), TypeError, ["lengths"], "bool lengths"),
            (st(lengths=torch.tensor([[0.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])), TypeError, ["lengths"],
             "NaN float lengths"),
            (st(lengths=steps_lengths.to(torch.uint8) + 250), (ValueError, RuntimeError), ["lengths"], "uint8 > time"),
            (st(lengths=[[0, 1, 2], [1, 1, 1]]), TypeError, ["lengths"], "list lengths"),
            (st(keep=steps_keep.float()), TypeError, ["keep"], "keep dtype"),
            (st(keep=steps_keep.to("meta")), ValueError, ["keep"], "keep on meta"),
            (st(lengths=steps_lengths.to("meta")), ValueError, ["lengths"], "lengths on meta"),
            (st(h=h0[0]), ValueError, ["h"], "h 2-D"),
    ):
        expect_refusal(call, exc, names, watched, what)


# ---- outputs edited in place, aliased residuals, integer kinds -----------------------------------------------------

@pytest.mark.parametrize("time", [1, 2, 5])
def test_gru_and_cell_outputs_edited_in_place_before_backward(time):
    """What gru and gru_cell return may be edited in place before the backward (as after torch.nn): the gradients
    are those of the edited result."""
    rng = random.Random(time)
    torch.manual_seed(time)
    a = Args()
    a.add("x", (3, time, 4), torch.float64, "plain", rng)
    a.add("h0", (2, 3, 5), torch.float64, "plain", rng)
    add_gru_weights(a, 4, 5, 2, True, torch.float64, rng, layouts=False)

    def edited(out, hn):
        out[:, -1, 1] = 0
        hn[0, 2] = 0
        return out, hn

    compare_runs(a, lambda v: edited(*gru(v["x"], v["h0"], gather_layers(v, 2, True), num_layers=2, backend=B)),
                 lambda v: edited(*gru_peer(v["x"], v["h0"], gather_layers(v, 2, True))), torch.float64,
                 f"gru edited t={time}")

    def cell_edited(out):
        out[1] = 0
        return out

    names = layer_names(1, True)
    compare_runs(a, lambda v: cell_edited(gru_cell(v["x"][:, 0], v["h0"][0], *[v[n] for n in names], backend=B)),
                 lambda v: cell_edited(cell_peer(v["x"][:, 0], v["h0"][0], *[v[n] for n in names])), torch.float64,
                 "cell edited")


@pytest.mark.parametrize("activation", ACTS)
def test_conv_residual_aliasing_x_through_a_view(activation):
    """A residual that is a view of x (same memory, another tensor object): both gradient paths reach x."""
    torch.manual_seed(1)
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    w = torch.randn(5, 5, 4, dtype=torch.float64) * 0.4
    g = torch.randn(2, 9, 5, dtype=torch.float64)
    grads = []
    for fn in (mine_conv, conv_peer):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        res = xl[:] if fn is mine_conv else xl
        out = fn(xl, wl, dilation=2, activation=activation, residual=res)
        out.backward(g)
        grads.append((out.detach(), xl.grad, wl.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_numpy_integers_are_taken_as_ints():
    """Integer arguments may be NumPy's (README): the same results as Python ints."""
    torch.manual_seed(2)
    x, w = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(6, 1, 3, dtype=torch.float64)
    want = causal_conv1d(x, w, dilation=2, groups=6, backend=B)
    got = causal_conv1d(x, w, dilation=np.int64(2), groups=np.int32(6), backend=B)
    assert torch.equal(got, want)
    state = CausalConvState.zeros(np.int64(2), np.int16(6), np.int64(3), np.uint8(2), dtype=torch.float64)
    assert type(state.kernel_size) is int and type(state.dilation) is int
    steps = [causal_conv1d_step(x[:, t], w, state, groups=np.int64(6), backend=B) for t in range(7)]
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=1e-12, atol=1e-12)
    xs, h0 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64)
    a = Args()
    add_gru_weights(a, 4, 5, 2, False, torch.float64, random.Random(0), layouts=False)
    _, v = a.fresh(requires_grad=False)
    ref = gru(xs, h0, gather_layers(v, 2, False), num_layers=2, backend=B)
    got = gru(xs, h0, gather_layers(v, 2, False), num_layers=np.int64(2), backend=B)
    assert all(torch.equal(p, q) for p, q in zip(ref, got, strict=True))


def test_causal_conv_state_zeros_bad_arguments_are_named():
    for kw, exc, name in ((dict(kernel_size=0), ValueError, "kernel_size"), (dict(dilation=0), ValueError, "dilation"),
                          (dict(batch=-1), ValueError, "batch"), (dict(in_channels=2.0), TypeError, "in_channels"),
                          (dict(dilation=True), TypeError, "dilation"),
                          (dict(kernel_size=3, dilation=2 ** 62), ValueError, "dilation")):
        args = {**dict(batch=2, in_channels=3, kernel_size=3, dilation=1), **kw}
        with pytest.raises(exc) as info:
            CausalConvState.zeros(args["batch"], args["in_channels"], args["kernel_size"], args["dilation"])
        assert name in str(info.value), str(info.value)
