"""Differential fuzzing of the GRU ops (gru_cell, gru, session_update, session_update_steps, gru_gates) on the
cpu and reference backends against peers written here from torch.nn.GRUCell / torch.nn.GRU / plain torch ops:
outputs and every gradient (by autograd), random shapes, bias on/off, non-contiguous views of every tensor
argument, lengths 0..time, bool and float keep, determinism, partial losses, and bad input."""

import random

import pytest
import torch
import torch.nn.functional as F

from helpers import EMULATING_CUDA
from hiertcn_fast.ops import gru, gru_cell, gru_gates, session_update, session_update_steps

BACKENDS = ["reference", "cpu"]


def _cuda_kernels(backend):
    """The cpu backend runs csrc/cuda's kernels in the emulator: lengths out of range are clamped there, not refused
    (refusing would take a device sync)."""
    return backend == "cpu" and EMULATING_CUDA
HIDDENS = (1, 2, 7, 15, 16, 17, 33, 64, 65, 128)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


# ---- independent peers ---------------------------------------------------------------------------

def peer_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """nn.GRUCell's math from plain torch ops (gate order r, z, n; reset on W_hn h + b_hn)."""
    gi = x @ w_ih.t()
    gh = h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
        gh = gh + b_hh
    hidden = h.shape[1]
    r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
    z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
    n = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
    return (1 - z) * n + z * h


def module_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch.nn.GRUCell itself, carrying the given tensors as its parameters."""
    cell = torch.nn.GRUCell(x.shape[1], h.shape[1], bias=b_ih is not None, dtype=x.dtype)
    params = {"weight_ih": w_ih, "weight_hh": w_hh}
    if b_ih is not None:
        params.update(bias_ih=b_ih, bias_hh=b_hh)
    return torch.func.functional_call(cell, params, (x, h))


def module_gru(x, h0, layers):
    """torch.nn.GRU(batch_first=True) carrying the given per-layer tensors: (output, h_n)."""
    bias = len(layers[0]) == 4
    hidden = layers[0][1].shape[1]
    module = torch.nn.GRU(x.shape[2], hidden, num_layers=len(layers), bias=bias, batch_first=True, dtype=x.dtype)
    names = [name for names in module._all_weights for name in names]
    params = dict(zip(names, [t for layer in layers for t in layer]))
    return torch.func.functional_call(module, params, (x, h0))


def peer_session_update(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    """The documented formula, row by row for the mean, nn.GRUCell math per layer."""
    batch = items.shape[0]
    means = []
    for b in range(batch):
        n = int(lengths[b])
        means.append(items[b, :n].sum(0) / n if n > 0 else items.new_zeros(items.shape[2]) * items[b, 0:1].sum())
    x = torch.stack(means) if batch else items.new_zeros(0, items.shape[2])
    if proj_weight is not None:
        x = x @ proj_weight.t() + (proj_bias if proj_bias is not None else 0)
    new = []
    for layer, weights in enumerate(layers):
        x = peer_cell(x, h[layer], *weights)
        new.append(x)
    new = torch.stack(new)
    active = torch.tensor([int(v) > 0 for v in lengths], dtype=torch.bool)[None, :, None]
    kept = torch.where(active, new, h)
    return kept * keep.to(h.dtype)[None, :, None]


def peer_session_steps(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    states = [h]
    for s in range(items.shape[0]):
        states.append(peer_session_update(items[s], lengths[s], states[-1], keep[s], layers, proj_weight, proj_bias))
    return torch.stack(states)


# ---- layouts: differentiable non-contiguous views of the same values -------------------------------

LAYOUTS = ("contiguous", "rows", "strided", "reversed")


def relayout(t, kind):
    """The same values as t in another memory layout, differentiably (the gradient reaches t)."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "rows":  # rows padded: unit stride along the last dim, larger row strides
        pad = torch.zeros(*t.shape[:-1], 3, dtype=t.dtype)
        wide = torch.cat([pad, t, pad], dim=-1)
        view = wide[..., 3:3 + t.shape[-1]]
    elif kind == "strided":  # every other element along the last dimension
        view = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    elif kind == "reversed":  # every stride order reversed (a transpose for 2-D)
        order = list(reversed(range(t.dim())))
        view = t.permute(order).contiguous().permute(order)
    else:
        raise AssertionError(kind)
    assert torch.equal(view, t)
    return view


def assert_close(a, b, dtype, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN"
    torch.testing.assert_close(a.to(b.dtype), b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def rnd(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_layers(g, input_size, hidden, num_layers, bias, dtype):
    scale = max(hidden, 1) ** -0.5
    layers = []
    for layer in range(num_layers):
        in_features = input_size if layer == 0 else hidden
        ws = [rnd(g, 3 * hidden, in_features, dtype=dtype, scale=scale), rnd(g, 3 * hidden, hidden, dtype=dtype,
                                                                              scale=scale)]
        if bias:
            ws += [rnd(g, 3 * hidden, dtype=dtype, scale=scale), rnd(g, 3 * hidden, dtype=dtype, scale=scale)]
        layers.append(ws)
    return layers


def grads_of(outputs, leaves, cotangents):
    needs = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(outputs, needs, cotangents, allow_unused=True)
    it = iter(got)
    return [next(it) if t.requires_grad else None for t in leaves]


def compare(mine_fn, peer_fn, values, dtype, requires, what, cotangent_mask=None, g=None):
    """Runs mine_fn and peer_fn (float64) on fresh leaves of values; compares outputs and the gradients of
    sum(out_i * cot_i) w.r.t. every leaf that requires grad (cotangent_mask zeroes whole outputs)."""
    mine_leaves = [v.detach().clone().requires_grad_(r) for v, r in zip(values, requires)]
    peer_leaves = [v.detach().double().clone().requires_grad_(r) for v, r in zip(values, requires)]
    originals = [v.detach().clone() for v in values]
    mine = mine_fn(*mine_leaves)
    theirs = peer_fn(*peer_leaves)
    mine = mine if isinstance(mine, tuple) else (mine,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.dtype == dtype, f"{what}: output {i} dtype {a.dtype}"
        assert_close(a, b, dtype, f"{what} output {i}")
    if any(requires):
        cots = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in theirs]
        if cotangent_mask is not None:
            cots = [c * m for c, m in zip(cots, cotangent_mask)]
        used = [i for i in range(len(cots)) if cotangent_mask is None or cotangent_mask[i]]
        mg = grads_of([mine[i] for i in used], mine_leaves, [cots[i].to(dtype) for i in used])
        pg = grads_of([theirs[i] for i in used], peer_leaves, [cots[i] for i in used])
        for i, (a, b, leaf) in enumerate(zip(mg, pg, mine_leaves)):
            if not leaf.requires_grad:
                continue
            a = torch.zeros_like(leaf) if a is None else a
            b = torch.zeros(leaf.shape, dtype=torch.float64) if b is None else b
            assert_close(a, b, dtype, f"{what} grad {i}")
    for i, (v, o) in enumerate(zip(values, originals)):
        assert torch.equal(v, o), f"{what}: input {i} was modified"


# ---- gru_cell ----------------------------------------------------------------------------------------

def _cell_case(seed):
    rng = random.Random(seed)
    return dict(hidden=rng.choice(HIDDENS), input=rng.choice((1, 3, 8, 17, 40)),
                batch=rng.choice((1, 2, 5, 31, 64, 300)), bias=rng.random() < 0.7,
                layouts=[rng.choice(LAYOUTS) for _ in range(6)], expand_h=rng.random() < 0.2,
                requires=[rng.random() < 0.8 for _ in range(6)], dtype=rng.choice((torch.float64, torch.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(24))
def test_cell_fuzz_against_nn_grucell(backend, seed):
    c = _cell_case(seed)
    g = torch.Generator().manual_seed(seed)
    dtype, hidden, batch = c["dtype"], c["hidden"], c["batch"]
    (layer,) = make_layers(g, c["input"], hidden, 1, c["bias"], dtype)
    x = rnd(g, batch, c["input"], dtype=dtype)
    h = rnd(g, 1 if c["expand_h"] else batch, hidden, dtype=dtype)
    values = [x, h, *layer]
    requires = c["requires"][:len(values)]
    layouts = c["layouts"][:len(values)]

    def mine(x, h, *w):
        h = h.expand(batch, hidden) if c["expand_h"] else h
        args = [relayout(t, k) for t, k in zip((x, h, *w), layouts)]
        return gru_cell(*args, backend=backend)

    def peer(x, h, *w):
        h = h.expand(batch, hidden) if c["expand_h"] else h
        return module_cell(x, h, *w)

    compare(mine, peer, values, dtype, requires, f"cell {c}", g=g)
    # and the plain-ops peer agrees with nn.GRUCell (the peer is right)
    with torch.no_grad():
        hh = h.expand(batch, hidden) if c["expand_h"] else h
        assert_close(peer_cell(x.double(), hh.double(), *[w.double() for w in layer]),
                     module_cell(x.double(), hh.double(), *[w.double() for w in layer]), torch.float64)


# ---- gru ---------------------------------------------------------------------------------------------

def _gru_case(seed):
    rng = random.Random(1000 + seed)
    return dict(hidden=rng.choice(HIDDENS[:8]), input=rng.choice((1, 4, 9, 16)), batch=rng.choice((1, 3, 17, 64)),
                time=rng.choice((1, 2, 3, 5, 7, 11)), layers=rng.choice((1, 2, 3)), bias=rng.random() < 0.7,
                h0=rng.random() < 0.75, layouts=[rng.choice(LAYOUTS) for _ in range(2 + 12)],
                requires=[rng.random() < 0.85 for _ in range(2 + 12)],
                loss=rng.choice(("both", "output", "h_n")), dtype=rng.choice((torch.float64, torch.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(20))
def test_gru_fuzz_against_nn_gru(backend, seed):
    c = _gru_case(seed)
    g = torch.Generator().manual_seed(seed)
    dtype = c["dtype"]
    layers = make_layers(g, c["input"], c["hidden"], c["layers"], c["bias"], dtype)
    per = len(layers[0])
    x = rnd(g, c["batch"], c["time"], c["input"], dtype=dtype)
    h0 = rnd(g, c["layers"], c["batch"], c["hidden"], dtype=dtype)
    flat = [t for layer in layers for t in layer]
    values = [x, h0, *flat]
    n = len(values)
    requires = c["requires"][:n]
    if not c["h0"]:
        requires[1] = False
    layouts = c["layouts"][:n]

    def mine(x, h0, *w):
        args = [relayout(t, k) for t, k in zip((x, h0, *w), layouts)]
        ws = [args[2 + i:2 + i + per] for i in range(0, len(w), per)]
        return gru(args[0], args[1] if c["h0"] else None, ws, num_layers=c["layers"], backend=backend)

    def peer(x, h0, *w):
        ws = [list(w[i:i + per]) for i in range(0, len(w), per)]
        return module_gru(x, h0 if c["h0"] else torch.zeros_like(h0), ws)

    mask = {"both": (1, 1), "output": (1, 0), "h_n": (0, 1)}[c["loss"]]
    compare(mine, peer, values, dtype, requires, f"gru {c}", cotangent_mask=mask, g=g)


# ---- session_update ------------------------------------------------------------------------------------

def _session_case(seed):
    rng = random.Random(2000 + seed)
    time = rng.choice((1, 2, 3, 5, 7))
    batch = rng.choice((1, 2, 5, 17, 40))
    lengths_kind = rng.choice(("mixed", "zero", "full", "mixed"))
    keep_kind = rng.choice(("bool", "float01", "float", "false", "zero"))
    return dict(hidden=rng.choice(HIDDENS[:8]), dim=rng.choice((1, 3, 8, 13)), batch=batch, time=time,
                layers=rng.choice((1, 2, 3)), bias=rng.random() < 0.7, proj=rng.choice((None, "bias", "nobias")),
                lengths=lengths_kind, keep=keep_kind, lengths_dtype=rng.choice((torch.int64, torch.int32,
                                                                                 torch.int16, torch.uint8)),
                layouts=[rng.choice(LAYOUTS) for _ in range(20)], lengths_strided=rng.random() < 0.4,
                requires=[rng.random() < 0.85 for _ in range(20)], dtype=rng.choice((torch.float64, torch.float32)))


def _session_values(c, g):
    dtype, batch, time = c["dtype"], c["batch"], c["time"]
    items = rnd(g, batch, time, c["dim"], dtype=dtype)
    lengths = {"mixed": torch.randint(0, time + 1, (batch,), generator=g),
               "zero": torch.zeros(batch, dtype=torch.int64),
               "full": torch.full((batch,), time, dtype=torch.int64)}[c["lengths"]]
    if c["lengths"] == "mixed" and batch >= 2:
        lengths[0], lengths[-1] = 0, time
    h = rnd(g, c["layers"], batch, c["hidden"], dtype=dtype)
    keep = {"bool": torch.rand(batch, generator=g) < 0.6,
            "false": torch.zeros(batch, dtype=torch.bool),
            "float01": (torch.rand(batch, generator=g) < 0.6).to(dtype),
            "float": rnd(g, batch, dtype=dtype),
            "zero": torch.zeros(batch, dtype=dtype)}[c["keep"]]
    in_size = c["dim"]
    proj = []
    if c["proj"] is not None:
        in_size = c["dim"] + 2
        proj = [rnd(g, in_size, c["dim"], dtype=dtype, scale=0.5)]
        if c["proj"] == "bias":
            proj.append(rnd(g, in_size, dtype=dtype))
    layers = make_layers(g, in_size, c["hidden"], c["layers"], c["bias"], dtype)
    return items, lengths, h, keep, proj, layers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(24))
def test_session_update_fuzz_against_documented_formula(backend, seed):
    c = _session_case(seed)
    g = torch.Generator().manual_seed(seed)
    items, lengths, h, keep, proj, layers = _session_values(c, g)
    dtype = c["dtype"]
    per = len(layers[0])
    flat = [t for layer in layers for t in layer]
    float_keep = keep.dtype != torch.bool
    values = [items, h] + ([keep] if float_keep else []) + proj + flat
    n = len(values)
    requires = c["requires"][:n]
    layouts = c["layouts"][:n]
    lengths_arg = lengths.to(c["lengths_dtype"])
    if c["lengths_strided"]:
        lengths_arg = torch.stack([lengths_arg, lengths_arg + 1], dim=1)[:, 0]

    def unpack(args):
        items, h = args[0], args[1]
        rest = list(args[2:])
        k = rest.pop(0) if float_keep else keep
        pw = rest.pop(0) if proj else None
        pb = rest.pop(0) if len(proj) == 2 else None
        ws = [rest[i:i + per] for i in range(0, len(rest), per)]
        return items, h, k, pw, pb, ws

    def mine(*args):
        args = [relayout(t, k) for t, k in zip(args, layouts)]
        items, h, k, pw, pb, ws = unpack(args)
        if not float_keep and c["layouts"][-1] == "strided":
            k = torch.stack([k, ~k], dim=1)[:, 0]
        return session_update(items, lengths_arg, h, k, ws, proj_weight=pw, proj_bias=pb, backend=backend)

    def peer(*args):
        items, h, k, pw, pb, ws = unpack(args)
        return peer_session_update(items, lengths, h, k, ws, pw, pb)

    compare(mine, peer, values, dtype, requires, f"session_update {c}", g=g)


# ---- session_update_steps -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(10))
def test_session_update_steps_fuzz_against_steps_of_the_formula(backend, seed):
    rng = random.Random(3000 + seed)
    g = torch.Generator().manual_seed(seed)
    dtype = rng.choice((torch.float64, torch.float32))
    steps, batch, time = rng.choice((1, 2, 3, 5)), rng.choice((1, 3, 8)), rng.choice((1, 2, 4))
    dim, hidden, nl = rng.choice((2, 5)), rng.choice((1, 7, 16, 17)), rng.choice((1, 2, 3))
    bias, projected = rng.random() < 0.7, rng.random() < 0.5
    float_keep = rng.random() < 0.6
    items = rnd(g, steps, batch, time, dim, dtype=dtype)
    lengths = torch.randint(0, time + 1, (steps, batch), generator=g)
    if steps > 1:
        lengths[0] = 0
    h = rnd(g, nl, batch, hidden, dtype=dtype)
    keep = rnd(g, steps, batch, dtype=dtype) if float_keep else torch.rand(steps, batch, generator=g) < 0.7
    in_size = dim + 1 if projected else dim
    proj = [rnd(g, in_size, dim, dtype=dtype), rnd(g, in_size, dtype=dtype)] if projected else []
    layers = make_layers(g, in_size, hidden, nl, bias, dtype)
    per = len(layers[0])
    flat = [t for layer in layers for t in layer]
    values = [items, h] + ([keep] if float_keep else []) + proj + flat
    requires = [rng.random() < 0.85 for _ in values]
    layouts = [rng.choice(LAYOUTS) for _ in values]
    loss = rng.choice(("all", "last"))

    def unpack(args):
        rest = list(args[2:])
        k = rest.pop(0) if float_keep else keep
        pw, pb = (rest.pop(0), rest.pop(0)) if proj else (None, None)
        return args[0], args[1], k, pw, pb, [rest[i:i + per] for i in range(0, len(rest), per)]

    def mine(*args):
        items, h, k, pw, pb, ws = unpack([relayout(t, k) for t, k in zip(args, layouts)])
        out = session_update_steps(items, lengths, h, k, ws, proj_weight=pw, proj_bias=pb, backend=backend)
        return out if loss == "all" else (out[:-1], out[-1])

    def peer(*args):
        items, h, k, pw, pb, ws = unpack(args)
        out = peer_session_steps(items, lengths, h, k, ws, pw, pb)
        return out if loss == "all" else (out[:-1], out[-1])

    mask = None if loss == "all" else (0, 1)
    compare(mine, peer, values, dtype, requires, f"steps seed {seed}", cotangent_mask=mask, g=g)


# ---- gru_gates -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", HIDDENS)
def test_gru_gates_against_plain_ops(backend, hidden):
    g = torch.Generator().manual_seed(hidden)
    for dtype in (torch.float64, torch.float32):
        batch = 1 + hidden % 7
        gi, gh = rnd(g, batch, 3 * hidden, dtype=dtype), rnd(g, batch, 3 * hidden, dtype=dtype)
        h = rnd(g, batch, hidden, dtype=dtype)
        layouts = [LAYOUTS[(hidden + i) % 4] for i in range(3)]

        def mine(gi, gh, h):
            return gru_gates(*[relayout(t, k) for t, k in zip((gi, gh, h), layouts)], backend=backend)

        def peer(gi, gh, h):
            r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
            z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
            n = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
            return (1 - z) * n + z * h

        compare(mine, peer, [gi, gh, h], dtype, [True, True, True], f"gates {hidden} {dtype}", g=g)


# ---- documented semantics of session_update -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_zero_lengths_keep_h_and_false_keep_zeroes(backend):
    g = torch.Generator().manual_seed(7)
    items = rnd(g, 6, 4, 5, dtype=torch.float64)
    h = rnd(g, 2, 6, 7, dtype=torch.float64)
    layers = make_layers(g, 5, 7, 2, True, torch.float64)
    zero = torch.zeros(6, dtype=torch.int64)
    ones = torch.ones(6, dtype=torch.bool)
    assert torch.equal(session_update(items, zero, h, ones, layers, backend=backend), h)
    assert torch.equal(session_update(items, zero, h, ones.to(torch.float64), layers, backend=backend), h)
    lengths = torch.tensor([0, 1, 4, 2, 0, 3])
    out = session_update(items, lengths, h, torch.zeros(6, dtype=torch.bool), layers, backend=backend)
    assert torch.equal(out, torch.zeros_like(h))
    # bool keep and its 0/1 float equal bitwise
    keep = torch.tensor([True, False, True, True, False, True])
    a = session_update(items, lengths, h, keep, layers, backend=backend)
    b = session_update(items, lengths, h, keep.to(torch.float64), layers, backend=backend)
    assert torch.equal(a, b)
    assert torch.equal(a[:, ~keep], torch.zeros_like(a[:, ~keep]))
    # items past each row's length are ignored
    items2 = items.clone()
    for row, n in enumerate(lengths.tolist()):
        items2[row, n:] = 1e6
    assert torch.equal(session_update(items2, lengths, h, keep, layers, backend=backend), a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_gradient_of_items_is_zero_past_lengths(backend):
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        items = rnd(g, 9, 5, 4, dtype=torch.float64).requires_grad_()
        h = rnd(g, 1, 9, 6, dtype=torch.float64).requires_grad_()
        lengths = torch.tensor([0, 5, 1, 2, 0, 3, 4, 5, 0])
        layers = make_layers(g, 4, 6, 1, True, torch.float64)
        out = session_update(items, lengths, h, torch.ones(9, dtype=torch.bool), layers, backend=backend)
        gi, gh = torch.autograd.grad(out.square().sum(), [items, h])
        for row, n in enumerate(lengths.tolist()):
            assert torch.equal(gi[row, n:], torch.zeros_like(gi[row, n:]))
            if n > 0:  # the mean's gradient: the same for each item
                assert torch.allclose(gi[row, :n], gi[row, :1].expand(n, -1))
        inactive = lengths == 0
        assert torch.equal(gh[0, inactive], 2 * h[0, inactive].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_lengths_out_of_range_are_refused(backend):
    g = torch.Generator().manual_seed(9)
    items = rnd(g, 3, 4, 5, dtype=torch.float64)
    h = rnd(g, 1, 3, 2, dtype=torch.float64)
    layers = make_layers(g, 5, 2, 1, True, torch.float64)
    keep = torch.ones(3)
    keep = keep.double()
    before = h.clone()
    for bad in ([0, 5, 1], [0, -1, 1], [4, 4, 100]):
        for dt in (torch.int64, torch.int32):
            if _cuda_kernels(backend):  # clamped to [0, time], as the CUDA kernels document
                got = session_update(items, torch.tensor(bad, dtype=dt), h, keep, layers, backend=backend)
                want = session_update(items, torch.tensor(bad, dtype=dt).clamp(0, 4), h, keep, layers,
                                      backend=backend)
                assert torch.equal(got, want), bad
                continue
            with pytest.raises(ValueError, match=r"lengths must lie in \[0, time = 4\]"):
                session_update(items, torch.tensor(bad, dtype=dt), h, keep, layers, backend=backend)
    assert torch.equal(h, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_keep_dtypes(backend):
    g = torch.Generator().manual_seed(10)
    items = rnd(g, 3, 4, 5, dtype=torch.float64)
    h = rnd(g, 1, 3, 2, dtype=torch.float64)
    layers = make_layers(g, 5, 2, 1, True, torch.float64)
    lengths = torch.tensor([1, 0, 4])
    for bad in (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.float32),
                torch.ones(3, dtype=torch.uint8)):
        with pytest.raises(TypeError, match="keep"):
            session_update(items, lengths, h, bad, layers, backend=backend)
    with pytest.raises(TypeError, match="keep must be a tensor"):
        session_update(items, lengths, h, [1, 1, 1], layers, backend=backend)
    with pytest.raises(ValueError, match="keep"):
        session_update(items, lengths, h, torch.ones(3, 1, dtype=torch.float64), layers, backend=backend)


# ---- determinism --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    g = torch.Generator().manual_seed(11)
    dtype = torch.float32
    x = rnd(g, 65, 7, 17, dtype=dtype)
    h0 = rnd(g, 2, 65, 33, dtype=dtype)
    layers = make_layers(g, 17, 33, 2, True, dtype)
    items = rnd(g, 65, 5, 17, dtype=dtype)
    lengths = torch.randint(0, 6, (65,), generator=g)
    keep = rnd(g, 65, dtype=dtype)
    steps_items = rnd(g, 3, 65, 5, 17, dtype=dtype)
    steps_lengths = torch.randint(0, 6, (3, 65), generator=g)
    steps_keep = rnd(g, 3, 65, dtype=dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, h0, items, keep, steps_items, steps_keep,
                                                       *[w for l in layers for w in l])]
        xl, hl, il, kl, sil, skl, *wl = leaves
        ws = [wl[:4], wl[4:]]
        out, hn = gru(xl, hl, ws, num_layers=2, backend=backend)
        cell = gru_cell(xl[:, 0], hl[0], *ws[0], backend=backend)
        su = session_update(il, lengths, hl, kl, ws, backend=backend)
        st = session_update_steps(sil, steps_lengths, hl, skl, ws, backend=backend)
        loss = out.square().sum() + hn.sum() + cell.cos().sum() + su.square().sum() + st.sin().sum()
        runs.append([t.detach() for t in torch.autograd.grad(loss, leaves)] + [out.detach(), su.detach()])
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical runs"


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    g = torch.Generator().manual_seed(12)
    d = torch.float64
    x, h = rnd(g, 3, 4, dtype=d), rnd(g, 3, 5, dtype=d)
    w_ih, w_hh, b_ih, b_hh = make_layers(g, 4, 5, 1, True, d)[0]
    snapshot = [t.clone() for t in (x, h, w_ih, w_hh, b_ih, b_hh)]

    def cell(**kw):
        args = dict(x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        args.update(kw)
        return gru_cell(args["x"], args["h"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
                        backend=backend)

    cases = [
        (dict(h=rnd(g, 3, 6, dtype=d)), ValueError, "w_"),            # hidden mismatch
        (dict(w_ih=rnd(g, 16, 4, dtype=d)), ValueError, "w_ih"),      # not 3 * hidden rows
        (dict(w_hh=rnd(g, 12, 5, dtype=d)), ValueError, "w_hh"),
        (dict(b_ih=rnd(g, 14, dtype=d)), ValueError, "b_ih"),
        (dict(b_hh=rnd(g, 15, 1, dtype=d)), ValueError, "b_hh"),
        (dict(x=x.float()), TypeError, "x"),
        (dict(h=h.float()), TypeError, None),
        (dict(b_hh=b_hh.float()), TypeError, "b_hh"),
        (dict(x=x[None]), ValueError, "x"),
        (dict(h=h[None]), ValueError, "h"),
        (dict(x=x.to("meta")), ValueError, "x"),
        (dict(w_hh=w_hh.to("meta")), ValueError, "w_hh"),
        (dict(x=x.long()), TypeError, "x"),
        (dict(x=rnd(g, 2, 4, dtype=d)), ValueError, "x"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc) as info:
            cell(**kw)
        if name is not None:
            assert name in str(info.value), (kw.keys(), str(info.value))

    xs = rnd(g, 3, 2, 4, dtype=d)
    h0 = rnd(g, 2, 3, 5, dtype=d)
    layers = make_layers(g, 4, 5, 2, True, d)
    gcases = [
        (dict(h0=h0[:, :, :4]), ValueError, "weights[0]"),
        (dict(weights=[layers[0], [layers[1][0][:12], *layers[1][1:]]]), ValueError, "weights[1] (w_ih)"),
        (dict(weights=[layers[0], [layers[1][0], layers[1][1], layers[1][2][:14], layers[1][3]]]), ValueError,
         "weights[1] (b_ih)"),
        (dict(x=xs.float()), TypeError, "x"),
        (dict(x=xs[0]), ValueError, "x"),
        (dict(h0=h0[0]), ValueError, "h0"),
        (dict(weights=[layers[0], [w.float() for w in layers[1]]]), TypeError, "weights[1]"),
        (dict(num_layers=3), ValueError, "h0"),
        (dict(x=xs[:, :0]), ValueError, "x"),
    ]
    for kw, exc, name in gcases:
        args = dict(x=xs, h0=h0, weights=layers, num_layers=2)
        args.update(kw)
        with pytest.raises(exc) as info:
            gru(args["x"], args["h0"], args["weights"], num_layers=args["num_layers"], backend=backend)
        assert name in str(info.value), (kw.keys(), str(info.value))

    items = rnd(g, 3, 4, 4, dtype=d)
    lengths = torch.tensor([1, 0, 4])
    keep = torch.ones(3, dtype=torch.bool)
    scases = [
        (dict(h=h0[:, :, :4]), ValueError, "weights[0]"),
        (dict(items=items.float()), TypeError, "item_embeddings"),
        (dict(items=items[0]), ValueError, "item_embeddings"),
        (dict(items=items[:2]), ValueError, "item_embeddings"),
        (dict(lengths=lengths[:2]), ValueError, "lengths"),
        (dict(lengths=lengths[None]), ValueError, "lengths"),
        (dict(lengths=lengths.double()), TypeError, "lengths"),
        *([] if _cuda_kernels(backend) else [(dict(lengths=torch.tensor([1, -2, 0])), (ValueError, RuntimeError),
                                              "lengths")]),
        (dict(keep=keep[:2]), ValueError, "keep"),
        (dict(weights=[[w.float() for w in layers[0]], layers[1]]), TypeError, "weights[0]"),
        (dict(weights=layers[:1]), ValueError, "weights"),
        (dict(weights=[layers[0], [layers[1][0], layers[1][1][:9], *layers[1][2:]]]), ValueError, "weights[1] (w_hh)"),
        (dict(weights=[layers[0], layers[1][:2]]), ValueError, "bias"),
        (dict(lengths=lengths.to("meta")), ValueError, "lengths"),
        (dict(keep=keep.to("meta")), ValueError, "keep"),
    ]
    for kw, exc, name in scases:
        args = dict(items=items, lengths=lengths, h=h0, keep=keep, weights=layers)
        args.update(kw)
        before = args["h"].clone()
        with pytest.raises(exc) as info:
            session_update(args["items"], args["lengths"], args["h"], args["keep"], args["weights"], backend=backend)
        assert name in str(info.value), (kw.keys(), str(info.value))
        assert torch.equal(args["h"], before)
    for t, s in zip((x, h, w_ih, w_hh, b_ih, b_hh), snapshot):
        assert torch.equal(t, s)


# ---- bigger shapes: the cpu backend's concurrent pair of products -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(300, 64, 128, 2, "bias", torch.float32), (257, 33, 65, 3, None, torch.float64),
                                  (64, 40, 128, 1, "nobias", torch.float64), (120, 128, 64, 2, None, torch.float32)],
                         ids=str)
def test_session_update_large_against_documented_formula(backend, case):
    batch, dim, hidden, nl, proj, dtype = case
    g = torch.Generator().manual_seed(batch + dim)
    c = dict(dtype=dtype, batch=batch, time=4, dim=dim, lengths="mixed", layers=nl, hidden=hidden,
             keep="float", proj=proj, bias=True)
    items, lengths, h, keep, proj_ts, layers = _session_values(c, g)
    per = len(layers[0])
    flat = [t for layer in layers for t in layer]
    values = [items, h, keep, *proj_ts, *flat]
    layouts = [LAYOUTS[i % 4] for i in range(len(values))]

    def unpack(args):
        rest = list(args[3:])
        pw = rest.pop(0) if proj_ts else None
        pb = rest.pop(0) if len(proj_ts) == 2 else None
        return args[0], args[1], args[2], pw, pb, [rest[i:i + per] for i in range(0, len(rest), per)]

    def mine(*args):
        items, h, k, pw, pb, ws = unpack([relayout(t, k) for t, k in zip(args, layouts)])
        return session_update(items, lengths, h, k, ws, proj_weight=pw, proj_bias=pb, backend=backend)

    def peer(*args):
        items, h, k, pw, pb, ws = unpack(args)
        return peer_session_update(items, lengths, h, k, ws, pw, pb)

    compare(mine, peer, values, dtype, [True] * len(values), f"large session {case}", g=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(300, 1, 40, 128, 2), (256, 3, 64, 64, 1), (200, 2, 17, 65, 3)], ids=str)
def test_gru_large_against_nn_gru(backend, case):
    batch, time, inp, hidden, nl = case
    g = torch.Generator().manual_seed(batch)
    for dtype in (torch.float64, torch.float32):
        layers = make_layers(g, inp, hidden, nl, True, dtype)
        x = rnd(g, batch, time, inp, dtype=dtype)
        h0 = rnd(g, nl, batch, hidden, dtype=dtype)
        values = [x, h0, *[t for layer in layers for t in layer]]

        def mine(x, h0, *w):
            return gru(relayout(x, "rows"), relayout(h0, "reversed"), [w[i:i + 4] for i in range(0, len(w), 4)],
                       num_layers=nl, backend=backend)

        def peer(x, h0, *w):
            return module_gru(x, h0, [list(w[i:i + 4]) for i in range(0, len(w), 4)])

        compare(mine, peer, values, dtype, [True] * len(values), f"large gru {case}", g=g)


# ---- empty batch, empty sessions ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    g = torch.Generator().manual_seed(13)
    d = torch.float64
    (layer,) = make_layers(g, 4, 5, 1, True, d)
    x, h = rnd(g, 0, 4, dtype=d), rnd(g, 0, 5, dtype=d)
    compare(lambda x, h, *w: gru_cell(x, h, *w, backend=backend), peer_cell, [x, h, *layer], d, [True] * 6,
            "empty cell", g=g)
    layers = make_layers(g, 4, 5, 2, True, d)
    xs, h0 = rnd(g, 0, 3, 4, dtype=d), rnd(g, 2, 0, 5, dtype=d)
    compare(lambda x, h0, *w: gru(x, h0, [w[:4], w[4:]], num_layers=2, backend=backend),
            lambda x, h0, *w: module_gru(x, h0, [list(w[:4]), list(w[4:])]), [xs, h0, *layers[0], *layers[1]], d,
            [True] * 10, "empty gru", g=g)
    items, lengths, hs, keep = rnd(g, 0, 3, 4, dtype=d), torch.zeros(0, dtype=torch.int64), h0, torch.ones(0, dtype=d)
    compare(lambda i, h, k, *w: session_update(i, lengths, h, k, [w[:4], w[4:]], backend=backend),
            lambda i, h, k, *w: peer_session_update(i, lengths, h, k, [w[:4], w[4:]]),
            [items, hs, keep, *layers[0], *layers[1]], d, [True] * 11, "empty session_update", g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_with_empty_time_axis(backend):
    g = torch.Generator().manual_seed(14)
    d = torch.float64
    layers = make_layers(g, 4, 5, 2, True, d)
    items, lengths = rnd(g, 3, 0, 4, dtype=d), torch.zeros(3, dtype=torch.int64)
    h, keep = rnd(g, 2, 3, 5, dtype=d), rnd(g, 3, dtype=d)
    compare(lambda i, h, k, *w: session_update(i, lengths, h, k, [w[:4], w[4:]], backend=backend),
            lambda i, h, k, *w: h * k[None, :, None] + 0 * i.sum(),
            [items, h, keep, *layers[0], *layers[1]], d, [True] * 11, "time 0 session_update", g=g)


# ---- without autograd: no_grad and inference_mode take other paths ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_leaf_requires_grad"])
def test_forward_without_autograd_matches_peers(backend, mode):
    g = torch.Generator().manual_seed(15)
    d = torch.float64
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no_leaf_requires_grad": torch.enable_grad}[mode]
    for hidden in (1, 17, 128):
        layers = make_layers(g, 9, hidden, 2, True, d)
        x, h = rnd(g, 70, 9, dtype=d), rnd(g, 1, hidden, dtype=d)
        xs, h0 = rnd(g, 70, 3, 9, dtype=d), rnd(g, 2, 70, hidden, dtype=d)
        items = rnd(g, 70, 4, 9, dtype=d)
        lengths = torch.randint(0, 5, (70,), generator=g)
        keep = rnd(g, 70, dtype=d)
        s_items, s_lengths, s_keep = rnd(g, 3, 70, 4, 9, dtype=d), torch.randint(0, 5, (3, 70), generator=g), \
            torch.rand(3, 70, generator=g) < 0.5
        with ctx():
            lay = [[relayout(t, LAYOUTS[(i + j) % 4]) for j, t in enumerate(layer)] for i, layer in enumerate(layers)]
            cell = gru_cell(relayout(x, "reversed"), h.expand(70, hidden), *lay[0], backend=backend)
            out, h_n = gru(relayout(xs, "strided"), relayout(h0, "reversed"), lay, num_layers=2, backend=backend)
            su = session_update(relayout(items, "reversed"), lengths, relayout(h0, "strided"),
                                relayout(keep, "strided"), lay, backend=backend)
            st = session_update_steps(s_items.transpose(0, 1).contiguous().transpose(0, 1), s_lengths, h0, s_keep,
                                      lay, backend=backend)
        assert_close(cell, peer_cell(x, h.expand(70, hidden), *layers[0]), d, "cell")
        p_out, p_hn = module_gru(xs, h0, layers)
        assert_close(out, p_out, d, "gru output")
        assert_close(h_n, p_hn, d, "gru h_n")
        assert_close(su, peer_session_update(items, lengths, h0, keep, layers), d, "session_update")
        assert_close(st, peer_session_steps(s_items, s_lengths, h0, s_keep, layers), d, "steps")


# ---- aliasing and shared weights ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_weights_and_aliased_arguments(backend):
    g = torch.Generator().manual_seed(16)
    d = torch.float64
    hidden = 7
    (layer,) = make_layers(g, hidden, hidden, 1, True, d)
    h = rnd(g, 5, hidden, dtype=d)
    # x is h; both layers share one set of weights
    compare(lambda h, *w: gru_cell(h, h, *w, backend=backend), lambda h, *w: peer_cell(h, h, *w),
            [h, *layer], d, [True] * 5, "aliased cell", g=g)
    xs, h0 = rnd(g, 5, 3, hidden, dtype=d), rnd(g, 3, 5, hidden, dtype=d)
    compare(lambda x, h0, *w: gru(x, h0, [w, w, w], num_layers=3, backend=backend),
            lambda x, h0, *w: module_gru(x, h0, [list(w)] * 3), [xs, h0, *layer], d, [True] * 6, "shared gru", g=g)
    items, lengths, keep = rnd(g, 5, 2, hidden, dtype=d), torch.tensor([0, 1, 2, 2, 1]), rnd(g, 5, dtype=d)
    compare(lambda i, h0, k, *w: session_update(i, lengths, h0, k, [w, w, w], backend=backend),
            lambda i, h0, k, *w: peer_session_update(i, lengths, h0, k, [list(w)] * 3),
            [items, h0, keep, *layer], d, [True] * 7, "shared session_update", g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_with_retain_graph_are_repeatable(backend):
    g = torch.Generator().manual_seed(17)
    d = torch.float64
    layers = make_layers(g, 6, 9, 2, True, d)
    leaves = [t.clone().requires_grad_() for layer in layers for t in layer]
    x = rnd(g, 4, 5, 6, dtype=d).requires_grad_()
    items, lengths = rnd(g, 4, 3, 6, dtype=d).requires_grad_(), torch.tensor([3, 0, 1, 2])
    h0 = rnd(g, 2, 4, 9, dtype=d).requires_grad_()
    ws = [leaves[:4], leaves[4:]]
    out, h_n = gru(x, h0, ws, num_layers=2, backend=backend)
    su = session_update(items, lengths, h0, torch.ones(4, dtype=torch.bool), ws, backend=backend)
    cell = gru_cell(x[:, 0], h0[0], *ws[0], backend=backend)
    loss = out.sum() + h_n.square().sum() + su.cos().sum() + cell.sum()
    first = torch.autograd.grad(loss, [x, h0, items, *leaves], retain_graph=True)
    second = torch.autograd.grad(loss, [x, h0, items, *leaves])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- more bad input -------------------------------------------------------------------------------------

# With h0=None, gru read weights[0][1].shape before any check, so a missing (None) or non-tensor w_hh of layer 0
# raised AttributeError: 'NoneType' object has no attribute 'shape' instead of the TypeError naming weights[0] (w_hh)
# that the same call with h0 given raises.
@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_without_h0_names_a_bad_w_hh(backend):
    g = torch.Generator().manual_seed(18)
    d = torch.float64
    (layer,) = make_layers(g, 4, 5, 1, True, d)
    xs = rnd(g, 3, 2, 4, dtype=d)
    with pytest.raises(TypeError, match=r"w_hh.*must be a torch.Tensor"):
        gru(xs, None, [[layer[0], None]], num_layers=1, backend=backend)
    with pytest.raises(TypeError, match=r"w_hh.*must be a torch.Tensor"):
        gru(xs, None, [[layer[0], "w_hh"]], num_layers=1, backend=backend)


# ---- saturated and tiny pre-activations ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-6, 0.3, 3.0, 30.0, 300.0])
def test_cell_saturated_and_tiny_preactivations(backend, scale):
    g = torch.Generator().manual_seed(int(scale * 1e6) % 1000)
    for dtype in (torch.float64, torch.float32):
        for hidden in (1, 15, 33):
            (layer,) = make_layers(g, 6, hidden, 1, True, dtype)
            layer = [w * scale for w in layer]
            x, h = rnd(g, 9, 6, dtype=dtype), rnd(g, 9, hidden, dtype=dtype)
            compare(lambda *a: gru_cell(*a, backend=backend), peer_cell, [x, h, *layer], dtype, [True] * 6,
                    f"saturated cell scale {scale} hidden {hidden} {dtype}", g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_and_session_update_with_expanded_arguments(backend):
    """Stride-0 views (a broadcast hidden state, one session shared by every row, one weight row repeated)."""
    g = torch.Generator().manual_seed(19)
    d = torch.float64
    batch, time, inp, hidden = 6, 4, 5, 7
    layers = make_layers(g, inp, hidden, 2, True, d)
    x_row, h_row = rnd(g, 1, time, inp, dtype=d), rnd(g, 2, 1, hidden, dtype=d)
    flat = [t for layer in layers for t in layer]
    compare(lambda x, h, *w: gru(x.expand(batch, -1, -1), h.expand(-1, batch, -1), [w[:4], w[4:]], num_layers=2,
                                 backend=backend),
            lambda x, h, *w: module_gru(x.expand(batch, -1, -1), h.expand(-1, batch, -1),
                                        [list(w[:4]), list(w[4:])]),
            [x_row, h_row, *flat], d, [True] * 10, "expanded gru", g=g)
    item = rnd(g, 1, 1, inp, dtype=d)
    lengths = torch.tensor([0, 1, 2, 3, 4, 4])
    keep = rnd(g, 1, dtype=d)
    compare(lambda i, h, k, *w: session_update(i.expand(batch, time, -1), lengths, h.expand(-1, batch, -1),
                                               k.expand(batch), [w[:4], w[4:]], backend=backend),
            lambda i, h, k, *w: peer_session_update(i.expand(batch, time, -1), lengths, h.expand(-1, batch, -1),
                                                    k.expand(batch), [list(w[:4]), list(w[4:])]),
            [item, h_row, keep, *flat], d, [True] * 11, "expanded session_update", g=g)
    # a cell whose x is one row broadcast over the batch and whose biases are a stride-0 view
    (cell_layer,) = make_layers(g, inp, hidden, 1, False, d)
    b = rnd(g, 1, dtype=d)
    compare(lambda x, h, w_ih, w_hh, b: gru_cell(x.expand(batch, -1), h.expand(batch, -1), w_ih, w_hh,
                                                 b.expand(3 * hidden), b.expand(3 * hidden), backend=backend),
            lambda x, h, w_ih, w_hh, b: peer_cell(x.expand(batch, -1), h.expand(batch, -1), w_ih, w_hh,
                                                  b.expand(3 * hidden), b.expand(3 * hidden)),
            [x_row[:, 0], h_row[0], *cell_layer, b], d, [True] * 5, "expanded cell", g=g)


# ---- gradients through some outputs only ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["output", "h_n", "h_n_last_layer", "output_last_step"])
@pytest.mark.parametrize("time,num_layers", [(1, 1), (1, 3), (4, 1), (5, 3)])
def test_gru_gradient_through_some_outputs(backend, loss, time, num_layers):
    g = torch.Generator().manual_seed(time * 10 + num_layers)
    d = torch.float64
    layers = make_layers(g, 5, 6, num_layers, True, d)
    x, h0 = rnd(g, 4, time, 5, dtype=d), rnd(g, num_layers, 4, 6, dtype=d)
    flat = [t for layer in layers for t in layer]

    def pick(result):
        out, h_n = result
        return {"output": out, "h_n": h_n, "h_n_last_layer": h_n[-1], "output_last_step": out[:, -1]}[loss]

    compare(lambda x, h0, *w: pick(gru(x, h0, [w[i:i + 4] for i in range(0, len(w), 4)], num_layers=num_layers,
                                       backend=backend)),
            lambda x, h0, *w: pick(module_gru(x, h0, [list(w[i:i + 4]) for i in range(0, len(w), 4)])),
            [x, h0, *flat], d, [True] * len(flat + [x, h0]), f"partial gru {loss}", g=g)


# ---- the autograd.Functions that torch.compile traces, run eagerly --------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_traced_autograd_functions_against_peers(seed):
    from hiertcn_fast.ops.gru import _GruLayerFunction, _SessionUpdateFunction
    c = _session_case(seed)
    c["keep"] = "float"
    g = torch.Generator().manual_seed(seed)
    items, lengths, h, keep, proj, layers = _session_values(c, g)
    dtype, per = c["dtype"], len(layers[0])
    flat = [t for layer in layers for t in layer]
    values = [items, h, keep, *proj, *flat]

    def unpack(args):
        rest = list(args[3:])
        pw = rest.pop(0) if proj else None
        pb = rest.pop(0) if len(proj) == 2 else None
        return args[0], args[1], args[2], pw, pb, rest

    def mine(*args):
        items, h, k, pw, pb, w = unpack(args)
        return _SessionUpdateFunction.apply(items, lengths, h, k, pw, pb, *w)

    def peer(*args):
        items, h, k, pw, pb, w = unpack(args)
        return peer_session_update(items, lengths, h, k, [w[i:i + per] for i in range(0, len(w), per)], pw, pb)

    compare(mine, peer, values, dtype, [True] * len(values), f"traced session_update {c}", g=g)

    (cell_layer,) = make_layers(g, 5, c["hidden"], 1, c["bias"], dtype)
    x, hc = rnd(g, c["batch"], 5, dtype=dtype), rnd(g, c["batch"], c["hidden"], dtype=dtype)

    def mine_cell(x, h, w_ih, w_hh, *b):
        b = list(b) if b else [None, None]
        return _GruLayerFunction.apply(x, h, w_ih, w_hh, b[0], b[1], True)

    compare(mine_cell, peer_cell, [x, hc, *cell_layer], dtype, [True] * len(cell_layer + [x, hc]),
            f"traced cell {c}", g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_update_projection_and_steps_bad_input(backend):
    g = torch.Generator().manual_seed(20)
    d = torch.float64
    items, lengths, keep = rnd(g, 3, 4, 5, dtype=d), torch.tensor([1, 0, 4]), torch.ones(3, dtype=torch.bool)
    h = rnd(g, 1, 3, 6, dtype=d)
    layers = make_layers(g, 7, 6, 1, True, d)
    pw, pb = rnd(g, 7, 5, dtype=d), rnd(g, 7, dtype=d)
    cases = [
        (dict(proj_weight=pw.float()), TypeError, "proj_weight"),
        (dict(proj_weight=pw[None]), ValueError, "proj_weight"),
        (dict(proj_weight=pw[:, :4]), ValueError, "proj_weight"),
        (dict(proj_weight=pw, proj_bias=pb[:6]), ValueError, "proj_bias"),
        (dict(proj_weight=pw, proj_bias=pb.float()), TypeError, "proj_bias"),
        (dict(proj_bias=pb), ValueError, "proj_bias"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            session_update(items, lengths, h, keep, layers, backend=backend, **kw)
    steps_items = items[None].expand(2, -1, -1, -1)
    steps_lengths, steps_keep = lengths[None].expand(2, -1), keep[None].expand(2, -1)
    session_update_steps(steps_items, steps_lengths, h, steps_keep, layers, proj_weight=pw, proj_bias=pb,
                         backend=backend)
    for kw, exc, name in [(dict(keep=steps_keep.long()), TypeError, "keep"),
                          (dict(keep=steps_keep.float()), TypeError, "keep"),
                          (dict(lengths=steps_lengths.float()), TypeError, "lengths"),
                          *([] if _cuda_kernels(backend) else
                            [(dict(lengths=steps_lengths - 2), (ValueError, RuntimeError), "lengths")]),
                          (dict(h=h.float()), TypeError, "h")]:
        args = dict(items=steps_items, lengths=steps_lengths, h=h, keep=steps_keep)
        args.update(kw)
        with pytest.raises(exc, match=name):
            session_update_steps(args["items"], args["lengths"], args["h"], args["keep"], layers, proj_weight=pw,
                                 proj_bias=pb, backend=backend)


# ---- a degenerate hidden size of 0: every op and backend alike --------------------------------------------

# session_update on the cpu backend with hidden size 0 and biases raised "RuntimeError: gru_gates_bias_cpu: the saved
# gates are required" (its empty gates buffer has no data pointer), where the reference backend returns the empty
# (layers, batch, 0) state, and gru_cell, gru and session_update_steps on the cpu backend handle hidden 0.
@pytest.mark.parametrize("bias", [True, False])
def test_hidden_size_zero_on_cpu_matches_reference(bias):
    g = torch.Generator().manual_seed(21)
    d = torch.float64
    layers = make_layers(g, 4, 0, 2, bias, d)
    flat = [t for layer in layers for t in layer]
    per = len(layers[0])
    items, lengths = rnd(g, 3, 2, 4, dtype=d), torch.tensor([0, 1, 2])
    h, keep = rnd(g, 2, 3, 0, dtype=d), rnd(g, 3, dtype=d)

    def run(backend):
        return lambda i, hh, k, *w: session_update(i, lengths, hh, k, [w[:per], w[per:]], backend=backend)

    compare(run("cpu"), run("reference"), [items, h, keep, *flat], d, [True] * (3 + len(flat)),
            f"session_update hidden 0 bias={bias}", g=g)
