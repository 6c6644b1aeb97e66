"""Differential fuzzing of the nn drop-ins against their torch.nn peers.

hiertcn_fast.nn.GRUCell / GRU against torch.nn.GRUCell / GRU carrying the same weights, and CausalConv1d /
TemporalBlock / TCN against compositions of nn.Conv1d and nn.Linear: random constructor arguments and inputs,
outputs, final states and every gradient; state_dict round trips, copies, dtype conversion, train/eval,
parameter names, and bad input (where torch.nn raises, the drop-in raises too).
"""

import copy
import io
import pickle
import random

import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.nn import GRU, TCN, CausalConv1d, GRUCell, TemporalBlock

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}
HIDDEN = (1, 7, 33)
SEQ_LENS = (1, 2, 3, 5, 7, 13)
BACKENDS = (None, None, "cpu", "reference")  # the modules' backend argument (None: auto, the cpu kernels here)


def close(got, want, dtype=None, msg=""):
    dtype = dtype or want.dtype
    assert got.shape == want.shape, (msg, got.shape, want.shape)
    assert got.dtype == want.dtype, (msg, got.dtype, want.dtype)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{msg}: {m}")


def noncontiguous(t):
    """The same values in a non-contiguous tensor (every other element of a wider last dimension)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def maybe_noncontiguous(t, rng):
    return noncontiguous(t) if rng.random() < 0.5 else t


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def grads_of(outputs, inputs, params, seed=0):
    """Gradients of a fixed random projection of ``outputs`` w.r.t. the inputs (None skipped) and params."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    wrt = [t for t in inputs if t is not None] + list(params)
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def twin_gru(peer, **extra):
    """The hiertcn_fast twin of a torch.nn.GRU / GRUCell, with its weights (loaded through state_dict)."""
    if isinstance(peer, torch.nn.GRUCell):
        mine = GRUCell(peer.input_size, peer.hidden_size, peer.bias, dtype=peer.weight_ih.dtype, **extra)
    else:
        mine = GRU(peer.input_size, peer.hidden_size, peer.num_layers, peer.bias, peer.batch_first, peer.dropout,
                   dtype=peer.weight_ih_l0.dtype, **extra)
    mine.load_state_dict(peer.state_dict())
    mine.train(peer.training)
    return mine


# ---- GRUCell -------------------------------------------------------------------------------------

def test_gru_cell_fuzz_outputs_and_gradients_match_torch():
    rng = random.Random(1234)
    torch.manual_seed(1234)
    for trial in range(40):
        hidden = rng.choice(HIDDEN)
        input_size = rng.choice((1, 4, 9))
        bias = rng.random() < 0.7
        dtype = rng.choice((torch.float32, torch.float64))
        batch = rng.choice((1, 3, None))  # None: unbatched
        with_hx = rng.random() < 0.6
        peer = torch.nn.GRUCell(input_size, hidden, bias, dtype=dtype)
        backend = rng.choice(BACKENDS)
        mine = twin_gru(peer, backend=backend)
        shape = (input_size,) if batch is None else (batch, input_size)
        x = maybe_noncontiguous(torch.randn(shape, dtype=dtype), rng)
        hx = None
        if with_hx:
            hx = maybe_noncontiguous(torch.randn((hidden,) if batch is None else (batch, hidden), dtype=dtype), rng)
        results = []
        for module in (mine, peer):
            xl, hl = leaf(x), leaf(hx)
            out = module(xl, hl)
            results.append((out, grads_of([out], [xl, hl], module.parameters(), seed=trial)))
        (out_m, g_m), (out_p, g_p) = results
        case = f"trial {trial}: hidden={hidden} in={input_size} bias={bias} {dtype} batch={batch} hx={with_hx} " \
               f"backend={backend}"
        close(out_m, out_p, msg=case)
        assert len(g_m) == len(g_p)
        for i, (a, b) in enumerate(zip(g_m, g_p)):
            close(a, b, msg=f"{case} grad {i}")


# ---- GRU -----------------------------------------------------------------------------------------

def _random_gru_case(rng):
    return dict(hidden=rng.choice(HIDDEN), input_size=rng.choice((1, 4, 9)), num_layers=rng.randint(1, 3),
                bias=rng.random() < 0.7, batch_first=rng.random() < 0.5,
                dtype=rng.choice((torch.float32, torch.float64)), batch=rng.choice((1, 3, None)),
                time=rng.choice(SEQ_LENS), with_hx=rng.random() < 0.6)


def _gru_inputs(c, rng):
    h, t, b, dtype = c["hidden"], c["time"], c["batch"], c["dtype"]
    if b is None:
        x = torch.randn(t, c["input_size"], dtype=dtype)
        hx = torch.randn(c["num_layers"], h, dtype=dtype) if c["with_hx"] else None
    else:
        shape = (b, t, c["input_size"]) if c["batch_first"] else (t, b, c["input_size"])
        x = torch.randn(shape, dtype=dtype)
        hx = torch.randn(c["num_layers"], b, h, dtype=dtype) if c["with_hx"] else None
    x = maybe_noncontiguous(x, rng)
    if hx is not None:
        hx = maybe_noncontiguous(hx, rng)
    return x, hx


def test_gru_fuzz_outputs_h_n_and_gradients_match_torch():
    rng = random.Random(99)
    torch.manual_seed(99)
    for trial in range(50):
        c = _random_gru_case(rng)
        peer = torch.nn.GRU(c["input_size"], c["hidden"], num_layers=c["num_layers"], bias=c["bias"],
                            batch_first=c["batch_first"], dtype=c["dtype"])
        c["backend"] = rng.choice(BACKENDS)
        mine = twin_gru(peer, backend=c["backend"])
        x, hx = _gru_inputs(c, rng)
        results = []
        for module in (mine, peer):
            xl, hl = leaf(x), leaf(hx)
            out, h_n = module(xl, hl)
            results.append((out, h_n, grads_of([out, h_n], [xl, hl], module.parameters(), seed=trial)))
        (o_m, h_m, g_m), (o_p, h_p, g_p) = results
        close(o_m, o_p, msg=f"trial {trial} {c} output")
        close(h_m, h_p, msg=f"trial {trial} {c} h_n")
        for i, (a, b) in enumerate(zip(g_m, g_p)):
            close(a, b, msg=f"trial {trial} {c} grad {i}")


def test_gru_only_h_n_or_only_output_in_the_loss():
    """Gradients when the loss reads only h_n (every layer) or only the output."""
    torch.manual_seed(5)
    peer = torch.nn.GRU(4, 7, num_layers=3, batch_first=True, dtype=torch.float64)
    mine = twin_gru(peer)
    x, hx = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 3, 7, dtype=torch.float64)
    for pick in (0, 1):
        res = []
        for module in (mine, peer):
            xl, hl = leaf(x), leaf(hx)
            out = module(xl, hl)[pick]
            res.append(grads_of([out], [xl, hl], module.parameters()))
        for a, b in zip(*res):
            close(a, b)


def test_gru_step_sequence_equals_torch_forward_with_gradients():
    rng = random.Random(7)
    torch.manual_seed(7)
    for trial in range(12):
        c = _random_gru_case(rng)
        c["batch"] = rng.choice((1, 3))
        peer = torch.nn.GRU(c["input_size"], c["hidden"], num_layers=c["num_layers"], bias=c["bias"],
                            batch_first=True, dtype=c["dtype"])
        mine = twin_gru(peer)
        c["batch_first"] = True
        x, hx = _gru_inputs(c, rng)
        xl, hl = leaf(x), leaf(hx)
        h, outs = hl, []
        for t in range(x.shape[1]):
            out, h = mine.step(xl[:, t], h)
            outs.append(out)
        got = (torch.stack(outs, 1), h)
        g_m = grads_of(got, [xl, hl], mine.parameters(), seed=trial)
        xl2, hl2 = leaf(x), leaf(hx)
        want = peer(xl2, hl2)
        g_p = grads_of(want, [xl2, hl2], peer.parameters(), seed=trial)
        for a, b in zip(got, want):
            close(a, b, msg=f"{trial} {c}")
        for a, b in zip(g_m, g_p):
            close(a, b, msg=f"{trial} {c} grad")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gru_step_and_forward_under_no_grad_and_inference_mode(mode):
    torch.manual_seed(3)
    peer = torch.nn.GRU(4, 7, num_layers=2, batch_first=True)
    mine = twin_gru(peer)
    x = torch.randn(3, 6, 4)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        h, outs = None, []
        for t in range(6):
            out, h = mine.step(x[:, t], h)
            outs.append(out)
        want_out, want_h = peer(x)
        got_out, got_h = mine(x)
        cell_peer = torch.nn.GRUCell(4, 7)
        cell_got, cell_want = twin_gru(cell_peer)(x[:, 0]), cell_peer(x[:, 0])
    close(torch.stack(outs, 1), want_out)
    close(h, want_h)
    close(got_out, want_out)
    close(got_h, want_h)
    close(cell_got, cell_want)
    assert not got_out.requires_grad and not h.requires_grad


def test_gru_input_requiring_grad_under_no_grad_records_nothing():
    peer = torch.nn.GRU(4, 7, batch_first=True)
    mine = twin_gru(peer)
    x = torch.randn(2, 3, 4, requires_grad=True)
    with torch.no_grad():
        out, h = mine(x)
        out_s, h_s = mine.step(x[:, 0])
    assert not out.requires_grad and not h.requires_grad and not out_s.requires_grad


def test_gru_dropout_between_layers_like_torch():
    """dropout=1 in training zeroes every layer's input above the first, as torch.nn.GRU does (deterministic, so
    comparable); in eval dropout is off; one layer has no dropout to apply (after the last layer there is none)."""
    torch.manual_seed(11)
    for num_layers in (1, 2, 3):
        for batch_first in (True, False):
            peer = torch.nn.GRU(4, 7, num_layers, dropout=1.0 if num_layers > 1 else 0.0, batch_first=batch_first,
                                dtype=torch.float64)
            mine = twin_gru(peer)
            x = torch.randn((3, 5, 4) if batch_first else (5, 3, 4), dtype=torch.float64)
            hx = torch.randn(num_layers, 3, 7, dtype=torch.float64)
            for training in (True, False):
                peer.train(training), mine.train(training)
                res = []
                for module in (mine, peer):
                    xl, hl = leaf(x), leaf(hx)
                    out = module(xl, hl)
                    res.append((out, grads_of(out, [xl, hl], module.parameters())))
                for a, b in zip(res[0][0], res[1][0]):
                    close(a, b, msg=f"{num_layers} {training}")
                for a, b in zip(res[0][1], res[1][1]):
                    if a is None or b is None:
                        assert a is None and b is None or (a if b is None else b).abs().max() == 0
                    else:
                        close(a, b, msg=f"{num_layers} {training} grad")


def test_gru_dropout_half_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    peer = torch.nn.GRU(4, 7, 2, dropout=0.5, batch_first=True)
    mine = twin_gru(peer)
    x = torch.randn(3, 5, 4)
    mine.train()
    a, b = mine(x)[0], mine(x)[0]
    assert not torch.equal(a, b)
    mine.eval(), peer.eval()
    close(mine(x)[0], peer(x)[0])
    close(mine.step(x[:, 0])[0], peer(x[:, :1])[0][:, 0])


# ---- constructor, parameters, state_dict, copies -------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda M: M(3, 5),
    lambda M: M(3, 5, 2),
    lambda M: M(3, 5, 2, False),
    lambda M: M(3, 5, 3, True, True, 0.25),
    lambda M: M(3, 5, num_layers=2, bias=False, batch_first=True, dropout=0.5, device="cpu", dtype=torch.float64),
    lambda M: M(input_size=3, hidden_size=5, num_layers=3),
    lambda M: M(3, 5, bidirectional=False),
])
def test_gru_constructor_arguments_give_torchs_module(make):
    torch.manual_seed(0)
    peer = make(torch.nn.GRU)
    torch.manual_seed(0)
    mine = make(GRU)
    assert repr(mine) == repr(peer)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(mine, attr) == getattr(peer, attr) and type(getattr(mine, attr)) is type(getattr(peer, attr))
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in peer.named_parameters()]
    for (n, a), (_, b) in zip(mine.named_parameters(), peer.named_parameters()):
        assert torch.equal(a, b) and a.dtype == b.dtype, n  # same initialisation from the same seed
    assert list(mine.state_dict()) == list(peer.state_dict())


@pytest.mark.parametrize("make", [
    lambda M: M(3, 5), lambda M: M(3, 5, False), lambda M: M(3, 5, True, "cpu", torch.float64),
    lambda M: M(input_size=3, hidden_size=5, bias=False, dtype=torch.float64)])
def test_gru_cell_constructor_arguments_give_torchs_module(make):
    torch.manual_seed(0)
    peer = make(torch.nn.GRUCell)
    torch.manual_seed(0)
    mine = make(GRUCell)
    assert repr(mine) == repr(peer)
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in peer.named_parameters()]
    for a, b in zip(mine.parameters(), peer.parameters()):
        assert torch.equal(a, b) and a.dtype == b.dtype


def test_gru_state_dicts_round_trip_both_ways_and_strict_errors_match_torch():
    torch.manual_seed(0)
    for cls, peer_cls, args in ((GRU, torch.nn.GRU, (4, 7, 2)), (GRUCell, torch.nn.GRUCell, (4, 7))):
        mine, peer = cls(*args), peer_cls(*args)
        peer.load_state_dict(mine.state_dict())  # torch.nn loads ours
        for a, b in zip(mine.parameters(), peer.parameters()):
            assert torch.equal(a, b)
        mine2 = cls(*args)
        mine2.load_state_dict(peer.state_dict())  # and ours loads torch.nn's
        for a, b in zip(mine2.parameters(), peer.parameters()):
            assert torch.equal(a, b)
        wrong = peer_cls(5, *args[1:])
        for target in (mine, peer):
            with pytest.raises(RuntimeError, match="size mismatch"):
                target.load_state_dict(wrong.state_dict())
        nobias = peer_cls(*args, bias=False) if cls is GRUCell else peer_cls(*args, bias=False)
        for target in (mine, peer):
            with pytest.raises(RuntimeError, match="Missing key"):
                target.load_state_dict(nobias.state_dict())
        # torch.save / torch.load of a state_dict
        buf = io.BytesIO()
        torch.save(mine.state_dict(), buf)
        buf.seek(0)
        loaded = cls(*args)
        loaded.load_state_dict(torch.load(buf))
        for a, b in zip(loaded.parameters(), mine.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_gru_modules_copy_and_keep_working(how):
    torch.manual_seed(0)
    for module, x in ((GRU(4, 7, 2, batch_first=True, backend="reference"), torch.randn(2, 5, 4)),
                      (GRUCell(4, 7, backend="cpu"), torch.randn(2, 4))):
        if how == "deepcopy":
            copied = copy.deepcopy(module)
        elif how == "pickle":
            copied = pickle.loads(pickle.dumps(module))
        else:
            buf = io.BytesIO()
            torch.save(module, buf)
            buf.seek(0)
            copied = torch.load(buf, weights_only=False)
        assert type(copied) is type(module) and copied.backend == module.backend
        a, b = module(x), copied(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
        # the copy's parameters are its own
        with torch.no_grad():
            next(copied.parameters()).add_(1)
        assert not torch.equal(next(copied.parameters()), next(module.parameters()))


@pytest.mark.parametrize("conversion", ["double", "half", "bfloat16", "to_float64", "float"])
def test_gru_modules_after_dtype_conversion_match_torch(conversion):
    torch.manual_seed(0)
    for peer, x, hx in ((torch.nn.GRU(4, 7, 2, batch_first=True), torch.randn(3, 5, 4), torch.randn(2, 3, 7)),
                        (torch.nn.GRUCell(4, 7), torch.randn(3, 4), torch.randn(3, 7))):
        mine = twin_gru(peer)

        def convert(m):
            if conversion == "to_float64":
                return m.to(torch.float64)
            if conversion == "float":
                return m.double().float()
            return getattr(m, conversion)()
        mine, peer = convert(mine), convert(peer)
        dtype = next(peer.parameters()).dtype
        assert all(p.dtype == dtype for p in mine.parameters())
        xx, hh = x.to(dtype), hx.to(dtype)
        res = []
        for module in (mine, peer):
            xl, hl = leaf(xx), leaf(hh)
            out = module(xl, hl)
            out = out if isinstance(out, tuple) else (out,)
            res.append((out, grads_of([o.float() for o in out], [xl, hl], module.parameters())))
        for a, b in zip(res[0][0], res[1][0]):
            close(a, b, dtype)
        for a, b in zip(res[0][1], res[1][1]):
            close(a, b, dtype)


def test_gru_zero_grad_and_grad_accumulation_like_torch():
    torch.manual_seed(0)
    peer = torch.nn.GRU(4, 7, 2, batch_first=True, dtype=torch.float64)
    mine = twin_gru(peer)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    for module in (mine, peer):
        for _ in range(2):  # gradients accumulate
            module(x)[0].sum().backward()
    for a, b in zip(mine.parameters(), peer.parameters()):
        close(a.grad, b.grad)
    mine.zero_grad()
    assert all(p.grad is None for p in mine.parameters())
    mine(x)[0].sum().backward()
    peer.zero_grad()
    peer(x)[0].sum().backward()
    for a, b in zip(mine.parameters(), peer.parameters()):
        close(a.grad, b.grad)


def test_gru_frozen_parameters_and_gradient_only_to_hx():
    torch.manual_seed(0)
    peer = torch.nn.GRU(4, 7, 2, batch_first=True, dtype=torch.float64)
    mine = twin_gru(peer)
    for module in (mine, peer):
        module.requires_grad_(False)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    hx = torch.randn(2, 3, 7, dtype=torch.float64)
    out = mine(x)
    assert not out[0].requires_grad and not out[1].requires_grad
    res = []
    for module in (mine, peer):
        hl = leaf(hx)
        out = module(x, hl)
        res.append(grads_of(out, [hl], []))
    close(res[0][0], res[1][0])


# ---- bad input: where torch.nn raises, the drop-ins raise -----------------------------------------

def _raises(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_gru_modules_raise_where_torch_raises():
    torch.manual_seed(0)
    cell_peer, seq_peer = torch.nn.GRUCell(4, 7), torch.nn.GRU(4, 7, 2)
    seq_first_peer = torch.nn.GRU(4, 7, 2, batch_first=True)
    pairs = [(twin_gru(cell_peer), cell_peer), (twin_gru(seq_peer), seq_peer),
             (twin_gru(seq_first_peer), seq_first_peer)]
    cell_cases = [
        (torch.randn(3, 5),), (torch.randn(5),), (torch.randn(3, 4, 1),), (torch.randn(()),),
        (torch.randn(3, 4), torch.randn(2, 7)), (torch.randn(3, 4), torch.randn(3, 8)),
        (torch.randn(3, 4), torch.randn(7)), (torch.randn(4), torch.randn(1, 7)),
        (torch.randn(3, 4).double(),), (torch.randn(3, 4), torch.randn(3, 7).double()),
        (torch.randn(3, 4).long(),), (torch.randn(3, 4), torch.randn(3, 7, 1)),
    ]
    seq_cases = [
        (torch.randn(5, 3, 5),), (torch.randn(5, 5),), (torch.randn(5, 3, 4, 1),), (torch.randn(4),),
        (torch.randn(5, 3, 4), torch.randn(1, 3, 7)), (torch.randn(5, 3, 4), torch.randn(2, 3, 8)),
        (torch.randn(5, 4), torch.randn(2, 1, 7)), (torch.randn(1, 5, 4), torch.randn(2, 7)),
        (torch.randn(5, 3, 4).double(),), (torch.randn(5, 3, 4), torch.randn(2, 3, 7).double()),
        (torch.randn(5, 3, 4).half(),), (torch.randn(5, 3, 4).long(),),
    ]
    for mine, peer in pairs:
        cases = cell_cases if isinstance(peer, torch.nn.GRUCell) else seq_cases
        for args in cases:
            theirs, ours = _raises(lambda: peer(*args)), _raises(lambda: mine(*args))
            shapes = [tuple(a.shape) for a in args], [a.dtype for a in args]
            assert (theirs is None) == (ours is None), (type(peer).__name__, shapes, theirs, ours)
            if ours is not None:
                assert isinstance(ours, (ValueError, TypeError, RuntimeError)), ours
            else:  # both ran: same results
                a, b = mine(*args), peer(*args)
                for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    close(u, v)


STRIDED = {  # name: (make a base tensor of shape, view of the wanted shape)
    "expand-batch": (lambda s: (1, *s[1:]), lambda b, s: b.expand(*s)),
    "expand-last": (lambda s: (*s[:-1], 1), lambda b, s: b.expand(*s)),
    "transposed": (lambda s: (*s[:-2], s[-1], s[-2]), lambda b, s: b.transpose(-1, -2)),
    "every-other": (lambda s: (*s[:-1], 2 * s[-1]), lambda b, s: b[..., ::2]),
}


@pytest.mark.parametrize("layout", list(STRIDED))
def test_gru_modules_with_strided_inputs_and_hx_give_torchs_outputs_and_gradients(layout):
    """Expanded (stride 0), transposed and sliced input and hx: outputs and the gradients reaching the base
    tensors equal torch.nn's."""
    torch.manual_seed(1)
    base_shape, view = STRIDED[layout]
    dtype = torch.float64
    for peer, x_shape, h_shape, call in (
            (torch.nn.GRUCell(4, 7, dtype=dtype), (3, 4), (3, 7), lambda m, x, h: (m(x, h),)),
            (torch.nn.GRU(4, 7, 2, batch_first=True, dtype=dtype), (3, 5, 4), (2, 3, 7), lambda m, x, h: m(x, h)),
            (torch.nn.GRU(4, 7, 2, dtype=dtype), (5, 3, 4), (2, 3, 7), lambda m, x, h: m(x, h)),
            (torch.nn.GRU(4, 7, 3, batch_first=True, dtype=dtype), (3, 4), (3, 3, 7), "step")):
        mine = twin_gru(peer)
        xb, hb = torch.randn(base_shape(x_shape), dtype=dtype), torch.randn(base_shape(h_shape), dtype=dtype)
        res = []
        for module in (mine, peer):
            xl, hl = leaf(xb), leaf(hb)
            x, h = view(xl, x_shape), view(hl, h_shape)
            assert x.shape == x_shape and h.shape == h_shape
            if call == "step":
                out = module.step(x, h) if module is mine else \
                    (lambda o: (o[0][:, 0], o[1]))(module(x[:, None], h))
            else:
                out = call(module, x, h)
            res.append((out, grads_of(out, [xl, hl], module.parameters())))
        for a, b in zip(res[0][0], res[1][0]):
            close(a, b, msg=f"{layout} {peer}")
        for a, b in zip(res[0][1], res[1][1]):
            close(a, b, msg=f"{layout} {peer} grad")


def test_gru_packed_sequence_with_dropout_in_training_like_torch():
    """A PackedSequence through a training GRU with dropout=1 (deterministic): outputs, h_n, gradients."""
    torch.manual_seed(2)
    for batch_first in (True, False):
        peer = torch.nn.GRU(4, 7, 3, dropout=1.0, batch_first=batch_first, dtype=torch.float64)
        mine = twin_gru(peer)
        lengths = torch.tensor([3, 6, 1, 6])
        padded = torch.randn(4, 6, 4, dtype=torch.float64)
        res = []
        for module in (mine, peer):
            pl = leaf(padded)
            rows = pl if batch_first else pl.transpose(0, 1)
            packed = torch.nn.utils.rnn.pack_padded_sequence(rows, lengths, batch_first=batch_first,
                                                             enforce_sorted=False)
            out, h_n = module(packed)
            res.append(((out.data, h_n), grads_of([out.data, h_n], [pl], module.parameters())))
        for a, b in zip(res[0][0], res[1][0]):
            close(a, b)
        for a, b in zip(res[0][1], res[1][1]):
            close(a, b)


# ---- CausalConv1d ---------------------------------------------------------------------------------

def conv_peer(conv):
    """nn.Conv1d (and, with context, a second one over the context) carrying conv's weights, padded causally."""
    pad = (conv.kernel_size - 1) * conv.dilation
    main = torch.nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, dilation=conv.dilation,
                           groups=conv.groups, bias=conv.bias is not None, padding=pad,
                           dtype=conv.weight.dtype)
    with torch.no_grad():
        main.weight.copy_(conv.weight)
        if conv.bias is not None:
            main.bias.copy_(conv.bias)
    ctx = None
    if conv.context_weight is not None:
        ctx = torch.nn.Conv1d(conv.context_channels, conv.out_channels, conv.kernel_size, dilation=conv.dilation,
                              bias=False, padding=pad, dtype=conv.weight.dtype)
        with torch.no_grad():
            ctx.weight.copy_(conv.context_weight)
    return main, ctx


ACT = {None: lambda v: v, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}


def run_conv_peer(main, ctx, activation, x, context=None, residual=None):
    time = x.shape[1]
    z = main(x.transpose(1, 2))[..., :time]
    if ctx is not None:
        z = z + ctx(context[:, :, None].expand(-1, -1, time))[..., :time]
    out = ACT[activation](z.transpose(1, 2))
    return out if residual is None else ACT[activation](out + residual)


def test_causal_conv1d_fuzz_matches_nn_conv1d_with_gradients():
    rng = random.Random(2024)
    torch.manual_seed(2024)
    for trial in range(60):
        groups = rng.choice((1, 1, 2, 3))
        in_channels = groups * rng.choice((1, 2, 3))
        out_channels = groups * rng.choice((1, 2, 5))
        k = rng.randint(1, 6)
        dilation = rng.choice((1, 2, 3, 7))
        bias = rng.random() < 0.7
        context_channels = rng.choice((0, 0, 2))
        activation = rng.choice(list(ACT))
        with_residual = rng.random() < 0.3
        dtype = rng.choice((torch.float32, torch.float64))
        batch, time = rng.choice((1, 3)), rng.choice((1, 2, 3, 5, 7, 13, 29))
        backend = rng.choice(BACKENDS)
        conv = CausalConv1d(in_channels, out_channels, k, 1, 0, dilation, groups, bias, dtype=dtype,
                            context_channels=context_channels, activation=activation, backend=backend)
        main, ctx = conv_peer(conv)
        x = maybe_noncontiguous(torch.randn(batch, time, in_channels, dtype=dtype), rng)
        context = torch.randn(batch, context_channels, dtype=dtype) if context_channels else None
        residual = torch.randn(batch, time, out_channels, dtype=dtype) if with_residual else None
        case = (f"trial {trial}: in={in_channels} out={out_channels} k={k} d={dilation} g={groups} bias={bias} "
                f"ctx={context_channels} act={activation} res={with_residual} {dtype} b={batch} t={time} {backend}")
        xl, cl, rl = leaf(x), leaf(context), leaf(residual)
        got = conv(xl, cl, rl)
        g_m = grads_of([got], [xl, cl, rl], conv.parameters(), seed=trial)
        xl, cl, rl = leaf(x), leaf(context), leaf(residual)
        want = run_conv_peer(main, ctx, activation, xl, cl, rl)
        peer_params = list(main.parameters()) + ([] if ctx is None else list(ctx.parameters()))
        g_p = grads_of([want], [xl, cl, rl], peer_params, seed=trial)
        close(got, want, msg=case)
        assert len(g_m) == len(g_p), case
        for i, (a, b) in enumerate(zip(g_m, g_p)):
            close(a, b, msg=f"{case} grad {i}")
        # step by step == forward (inference), under no_grad and inference_mode
        for ctx_manager in (torch.no_grad, torch.inference_mode):
            with ctx_manager():
                state = conv.init_state(batch)
                steps = [conv.step(x[:, t], state, context, None if residual is None else residual[:, t])
                         for t in range(time)]
            close(torch.stack(steps, 1), got.detach(), msg=f"{case} step {ctx_manager.__name__}")


@pytest.mark.parametrize("args,kwargs", [
    ((4, 6, 3), {}), ((4, 6, 3, 1, 0, 2, 2, False), {}), ((6, 9, 1), dict(groups=3)),
    ((4, 4, (5,)), dict(dilation=(3,), groups=4, stride=(1,), padding=(0,))),
    ((4, 8, 2), dict(padding="valid", padding_mode="zeros", bias=False, device="cpu", dtype=torch.float64))])
def test_causal_conv1d_constructor_parameters_and_state_dicts_are_nn_conv1ds(args, kwargs):
    torch.manual_seed(0)
    peer = torch.nn.Conv1d(*args, **kwargs)
    torch.manual_seed(0)
    mine = CausalConv1d(*args, **kwargs)
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in peer.named_parameters()]
    for a, b in zip(mine.parameters(), peer.parameters()):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)  # same initialisation from the same seed
    assert list(mine.state_dict()) == list(peer.state_dict())
    other = torch.nn.Conv1d(*args, **kwargs)
    mine.load_state_dict(other.state_dict())
    peer.load_state_dict(mine.state_dict())
    for a, b in zip(mine.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert mine.in_channels == peer.in_channels and mine.out_channels == peer.out_channels
    assert mine.groups == peer.groups and mine.kernel_size == peer.kernel_size[0]
    assert mine.dilation == peer.dilation[0]
    text = repr(mine)
    assert text.startswith("CausalConv1d(") and f"kernel_size={mine.kernel_size}" in text
    assert f"bias={peer.bias is not None}" in text


def test_causal_conv1d_strict_loading_errors_match_nn_conv1d():
    mine, peer = CausalConv1d(4, 6, 3), torch.nn.Conv1d(4, 6, 3)
    for wrong in (torch.nn.Conv1d(4, 6, 5), torch.nn.Conv1d(5, 6, 3), torch.nn.Conv1d(4, 6, 3, groups=2)):
        for target in (mine, peer):
            with pytest.raises(RuntimeError, match="size mismatch"):
                target.load_state_dict(wrong.state_dict())
    for target in (mine, peer):
        with pytest.raises(RuntimeError, match="Missing key"):
            target.load_state_dict(torch.nn.Conv1d(4, 6, 3, bias=False).state_dict())
        with pytest.raises(RuntimeError, match="Unexpected key"):
            CausalConv1d(4, 6, 3, bias=False).load_state_dict(torch.nn.Conv1d(4, 6, 3).state_dict())


@pytest.mark.parametrize("kwargs", [
    dict(padding=1), dict(padding=(2,)), dict(padding="same"), dict(padding=2, padding_mode="zeros"),
    dict(padding_mode="reflect"), dict(padding_mode="circular"), dict(padding_mode="replicate"),
    dict(stride=2), dict(stride=(2,)), dict(groups=3), dict(groups=0), dict(kernel_size=0),
    dict(dilation=0), dict(kernel_size=(2, 2))])
def test_causal_conv1d_refuses_arguments_that_conflict_with_causality(kwargs):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)):
        CausalConv1d(**args)


def test_causal_conv1d_copies_dtype_conversions_and_zero_grad():
    torch.manual_seed(0)
    conv = CausalConv1d(4, 6, 3, dilation=2, groups=2, context_channels=3, activation="gelu")
    x, context = torch.randn(2, 9, 4), torch.randn(2, 3)
    want = conv(x, context)
    for copied in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert torch.equal(copied(x, context), want)
        assert repr(copied) == repr(conv)
    for conversion, dtype in (("double", torch.float64), ("half", torch.float16), ("bfloat16", torch.bfloat16)):
        converted = getattr(copy.deepcopy(conv), conversion)()
        assert all(p.dtype == dtype for p in converted.parameters())
        main, ctx = conv_peer(converted.double())
        converted = getattr(converted, conversion)()
        got = converted(x.to(dtype), context.to(dtype))
        assert got.dtype == dtype
        want64 = run_conv_peer(main, ctx, "gelu", x.to(dtype).double(), context.to(dtype).double())
        close(got.double(), want64, dtype)
        with torch.no_grad():
            state = converted.init_state(2)
            assert state.history.dtype == dtype
            steps = torch.stack([converted.step(x[:, t].to(dtype), state, context.to(dtype)) for t in range(9)], 1)
        close(steps.double(), want64, dtype)
    conv(x, context).sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    conv.zero_grad()
    assert all(p.grad is None for p in conv.parameters())


def test_causal_conv1d_bad_inputs_raise_where_nn_conv1d_raises():
    conv = CausalConv1d(4, 6, 3)
    peer = torch.nn.Conv1d(4, 6, 3, padding=2)
    for x in (torch.randn(2, 9, 5), torch.randn(2, 9, 4).double(), torch.randn(2, 9, 4).long(),
              torch.randn(2, 9, 4).half(), torch.randn(1, 2, 9, 4)):
        theirs = _raises(lambda: peer(x.transpose(-1, -2)))
        ours = _raises(lambda: conv(x))
        assert theirs is not None and ours is not None, (x.shape, x.dtype, theirs, ours)
        assert isinstance(ours, (ValueError, TypeError)), ours


def test_causal_conv1d_wrong_input_width_names_the_input():
    # x with the wrong channel count was blamed on the weight ("weight ... must have 5 input channels"); nn.Conv1d
    # says "expected input[...] to have 4 channels, but got 5 channels instead".
    conv = CausalConv1d(4, 6, 3)
    with pytest.raises(ValueError, match=r"x must be \(batch, time, in_channels = 4\), got shape \(2, 9, 5\): 5 "
                                         r"channels where this layer takes 4"):
        conv(torch.randn(2, 9, 5))


# ---- TemporalBlock and TCN -----------------------------------------------------------------------

def block_peer(block):
    """A function computing the block from nn.Conv1d / nn.Linear copies of its weights, and those parameters."""
    main, ctx = conv_peer(block.conv)
    proj = cproj = None
    params = list(main.parameters()) + ([] if ctx is None else list(ctx.parameters()))
    if block.projection is not None:
        proj = copy.deepcopy(block.projection)
        params += list(proj.parameters())
    if block.context_projection is not None:
        cproj = copy.deepcopy(block.context_projection)
        params += list(cproj.parameters())

    def run(x, context=None):
        residual = x if proj is None else proj(x)
        if cproj is not None:
            residual = residual + cproj(context)[:, None]
        return run_conv_peer(main, ctx, "relu", x, context, residual)
    return run, params


def test_temporal_block_fuzz_matches_its_torch_composition():
    rng = random.Random(77)
    torch.manual_seed(77)
    for trial in range(30):
        in_channels, out_channels = rng.choice((1, 3, 8)), rng.choice((1, 3, 8))
        k, dilation = rng.randint(1, 5), rng.choice((1, 2, 4))
        context_channels = rng.choice((0, 0, 3))
        dtype = rng.choice((torch.float32, torch.float64))
        batch, time = rng.choice((1, 3)), rng.choice((1, 2, 5, 11, 17))
        block = TemporalBlock(in_channels, out_channels, k, dilation, context_channels=context_channels, dtype=dtype)
        run, peer_params = block_peer(block)
        x = maybe_noncontiguous(torch.randn(batch, time, in_channels, dtype=dtype), rng)
        context = torch.randn(batch, context_channels, dtype=dtype) if context_channels else None
        case = f"trial {trial}: {in_channels}->{out_channels} k={k} d={dilation} ctx={context_channels} {dtype} " \
               f"b={batch} t={time}"
        xl, cl = leaf(x), leaf(context)
        got = block(xl, cl)
        g_m = grads_of([got], [xl, cl], block.parameters(), seed=trial)
        xl, cl = leaf(x), leaf(context)
        want = run(xl, cl)
        g_p = grads_of([want], [xl, cl], peer_params, seed=trial)
        assert_matches_peer_and_steps(block, got, want, g_m, g_p, x, context, case)


def assert_matches_peer_and_steps(module, got, want, grads, peer_grads, x, context, case):
    """The module's output and gradients equal its peer's, and stepping x (batch, time, ...) one event at a time,
    under no_grad and inference_mode, gives the output."""
    close(got, want, msg=case)
    assert len(grads) == len(peer_grads)
    for i, (a, b) in enumerate(zip(grads, peer_grads)):
        close(a, b, msg=f"{case} grad {i}")
    for ctx_manager in (torch.no_grad, torch.inference_mode):
        with ctx_manager():
            state = module.init_state(x.shape[0])
            steps = torch.stack([module.step(x[:, t], state, context) for t in range(x.shape[1])], 1)
        close(steps, got.detach(), msg=f"{case} step {ctx_manager.__name__}")


def test_tcn_fuzz_matches_its_torch_composition_and_steps():
    rng = random.Random(5)
    torch.manual_seed(5)
    for trial in range(20):
        depth = rng.randint(1, 4)
        in_channels = rng.choice((1, 4, 7))
        channels = [rng.choice((1, 4, 7, 16)) for _ in range(depth)]
        k = rng.randint(1, 5)
        dilations = None if rng.random() < 0.5 else [rng.choice((1, 2, 3, 5)) for _ in range(depth)]
        context_channels = rng.choice((0, 2))
        dtype = rng.choice((torch.float32, torch.float64))
        batch, time = rng.choice((1, 3)), rng.choice((1, 2, 3, 7, 19, 37))
        backend = rng.choice(BACKENDS)
        tcn = TCN(in_channels, channels, k, dilations, context_channels, dtype=dtype, backend=backend)
        peers = [block_peer(block) for block in tcn.blocks]
        x = maybe_noncontiguous(torch.randn(batch, time, in_channels, dtype=dtype), rng)
        context = torch.randn(batch, context_channels, dtype=dtype) if context_channels else None
        case = f"trial {trial}: {in_channels}->{channels} k={k} d={dilations} ctx={context_channels} {dtype} " \
               f"b={batch} t={time} {backend}"
        xl, cl = leaf(x), leaf(context)
        got = tcn(xl, cl)
        g_m = grads_of([got], [xl, cl], tcn.parameters(), seed=trial)
        xl, cl = leaf(x), leaf(context)
        h = xl
        for i, (run, _) in enumerate(peers):
            h = run(h, cl if i == 0 else None)
        g_p = grads_of([h], [xl, cl], [p for _, ps in peers for p in ps], seed=trial)
        assert_matches_peer_and_steps(tcn, got, h, g_m, g_p, x, context, case)


def test_tcn_step_after_a_partial_reset_restarts_those_rows():
    torch.manual_seed(4)
    tcn = TCN(3, [4, 5], 3, context_channels=2, dtype=torch.float64)
    x, context = torch.randn(3, 8, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        state = tcn.init_state(3)
        for t in range(5):
            tcn.step(x[:, t], state, context)
        state.reset(torch.tensor([False, True, False]))
        steps = torch.stack([tcn.step(x[:, t], state, context) for t in range(5, 8)], 1)
        whole = tcn(x, context)
        fresh = tcn(x[1:2, 5:8], context[1:2])
    close(steps[[0, 2]], whole[[0, 2], 5:8])
    close(steps[1:2], fresh)


def test_temporal_block_and_tcn_state_dicts_copies_and_dtype_conversions():
    torch.manual_seed(6)
    tcn = TCN(3, [4, 4, 6], 3, context_channels=2)
    x, context = torch.randn(2, 9, 3), torch.randn(2, 2)
    want = tcn(x, context)
    other = TCN(3, [4, 4, 6], 3, context_channels=2)
    other.load_state_dict(tcn.state_dict())
    assert torch.equal(other(x, context), want)
    for copied in (copy.deepcopy(tcn), pickle.loads(pickle.dumps(tcn))):
        assert torch.equal(copied(x, context), want)
    with pytest.raises(RuntimeError, match="size mismatch"):
        TCN(3, [4, 4, 7], 3, context_channels=2).load_state_dict(tcn.state_dict())
    for conversion, dtype in (("double", torch.float64), ("half", torch.float16), ("bfloat16", torch.bfloat16)):
        converted = getattr(copy.deepcopy(tcn), conversion)()
        got = converted(x.to(dtype), context.to(dtype))
        assert got.dtype == dtype
        close(got.double(), tcn.double()(x.double(), context.double()), dtype)
        tcn.float()
        with torch.no_grad():
            state = converted.init_state(2)
            steps = torch.stack([converted.step(x[:, t].to(dtype), state, context.to(dtype)) for t in range(9)], 1)
        close(steps.double(), got.double(), dtype)


def test_step_inputs_requiring_grad_run_under_no_grad_and_inference_mode():
    torch.manual_seed(8)
    conv, block, tcn = CausalConv1d(3, 4, 3), TemporalBlock(3, 4, 3), TCN(3, [4, 5], 3)
    x = torch.randn(2, 5, 3, requires_grad=True)
    for module in (conv, block, tcn):
        want = module(x).detach()
        for ctx_manager in (torch.no_grad, torch.inference_mode):
            with ctx_manager():
                state = module.init_state(2)
                steps = torch.stack([module.step(x[:, t], state) for t in range(5)], 1)
            close(steps, want)
        with pytest.raises(RuntimeError, match="inference"):
            module.step(x[:, 0], module.init_state(2))


def test_temporal_block_and_tcn_wrong_input_width_names_the_input():
    # The same through an identity-residual block, and a TCN starting with one.
    for module in (TemporalBlock(4, 4, 3), TCN(4, [4, 6], 3)):
        with pytest.raises(ValueError, match=r"x must be \(batch, time, in_channels = 4\), got shape \(2, 9, 5\)"):
            module(torch.randn(2, 9, 5))


def test_large_shapes_cross_the_kernels_blas_and_parallel_paths():
    """Batches, widths and channel counts past the kernels' thresholds (BLAS for 32+ channels, parallel rows)."""
    torch.manual_seed(12)
    dtype = torch.float64
    for batch, time, input_size, hidden, layers in ((64, 7, 40, 33, 2), (129, 2, 3, 65, 3)):
        peer = torch.nn.GRU(input_size, hidden, layers, batch_first=True, dtype=dtype)
        mine = twin_gru(peer)
        x, hx = torch.randn(batch, time, input_size, dtype=dtype), torch.randn(layers, batch, hidden, dtype=dtype)
        res = []
        for module in (mine, peer):
            xl, hl = leaf(x), leaf(hx)
            out = module(xl, hl)
            res.append((out, grads_of(out, [xl, hl], module.parameters())))
        for a, b in zip([*res[0][0], *res[0][1]], [*res[1][0], *res[1][1]]):
            close(a, b)
    for batch, time, cin, cout, k, dilation, groups in ((3, 40, 64, 64, 3, 2, 1), (2, 17, 48, 96, 5, 1, 3),
                                                         (1, 9, 32, 32, 2, 8, 32)):
        conv = CausalConv1d(cin, cout, k, dilation=dilation, groups=groups, dtype=dtype, activation="relu")
        main, _ = conv_peer(conv)
        x, r = torch.randn(batch, time, cin, dtype=dtype), torch.randn(batch, time, cout, dtype=dtype)
        xl, rl = leaf(x), leaf(r)
        got = conv(xl, None, rl)
        g_m = grads_of([got], [xl, rl], conv.parameters())
        xl, rl = leaf(x), leaf(r)
        want = run_conv_peer(main, None, "relu", xl, None, rl)
        g_p = grads_of([want], [xl, rl], main.parameters())
        for a, b in zip([got, *g_m], [want, *g_p]):
            close(a, b)
    tcn = TCN(64, [64, 128, 64], 3, context_channels=48, dtype=dtype)
    x, context = torch.randn(3, 21, 64, dtype=dtype), torch.randn(3, 48, dtype=dtype)
    got = tcn(x, context)
    h = x
    for i, block in enumerate(tcn.blocks):
        h = block_peer(block)[0](h, context if i == 0 else None)
    close(got, h)
    with torch.no_grad():
        state = tcn.init_state(3)
        close(torch.stack([tcn.step(x[:, t], state, context) for t in range(21)], 1), got)


def test_tcn_step_shortcut_takes_strided_inputs_and_still_checks_them():
    """After the first steps arm TCN.step's shortcut, strided x_t (transposed, expanded) give forward()'s outputs,
    and a wrong width, batch or dtype is still refused."""
    torch.manual_seed(13)
    for context_channels in (0, 2):
        tcn = TCN(3, [4, 5], 3, context_channels=context_channels)
        x = torch.randn(2, 6, 3)
        x[1] = x[0]
        context = torch.randn(1, context_channels).expand(2, -1) if context_channels else None
        want = tcn(x, context).detach()
        with torch.no_grad():
            state = tcn.init_state(2)
            steps = [tcn.step(x[:, t].clone(), state, context) for t in range(2)]
            steps.append(tcn.step(x[:, 2].T.contiguous().T, state, context))
            steps.append(tcn.step(x[:1, 3].expand(2, 3), state, context))
            steps.append(tcn.step(noncontiguous(x[:, 4]), state, context))
            steps.append(tcn.step(x[:, 5], state, context))
            close(torch.stack(steps, 1), want)
            for bad, error in ((torch.randn(2, 4), ValueError), (torch.randn(3, 3), ValueError),
                               (torch.randn(2, 3, dtype=torch.float64), TypeError)):
                with pytest.raises(error):
                    tcn.step(bad, state, context)
