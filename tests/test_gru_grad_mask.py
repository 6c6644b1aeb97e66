"""The GRU ops' backward computes only the gradients that are wanted: a frozen w_ih or w_hh costs no product, a
frozen bias pair no sum, and a state that wants no gradient (nn.GRU's zero h0, a state carried over from a
detached batch) no W_hh product for it. What is computed must be what the full backward gives, on every backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hiertcn_fast.ops import gru, gru_cell, session_update, session_update_steps
from gru_helpers import layer_weights
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, assert_close, rand

CELL_NAMES = ("x", "h", "w_ih", "w_hh", "b_ih", "b_hh")
# Which of the cell's arguments want a gradient: a frozen cell over data (x and h only), the input side frozen,
# the state side frozen, the weights frozen with trainable biases, one bias of the pair alone, and everything
# but the state (a state carried over from a detached batch).
WANTS = [("x", "h"), ("h", "w_hh", "b_hh"), ("x", "w_ih", "b_ih"), ("h", "b_ih", "b_hh"), ("x", "b_hh"),
         ("w_ih",), ("x", "w_ih", "w_hh", "b_ih", "b_hh")]


def _grads(fn, tensors, names, want, grad_out):
    call = [t.detach().clone().requires_grad_(name in want) for t, name in zip(tensors, names)]
    out = fn(*call)
    torch.autograd.backward(out, grad_out)
    return out, [t.grad for t in call]


def _check(out, part, out_full, full, names, want, backend, dtype):
    exact = backend != "reference"  # the same kernels on the same inputs give the same bits
    for got, expected in zip(out if isinstance(out, tuple) else (out,), out_full if isinstance(out, tuple)
                             else (out_full,)):
        assert torch.equal(got, expected) if exact else torch.allclose(got, expected)
    for name, grad, expected in zip(names, part, full):
        if name not in want:
            assert grad is None, name
        elif exact:
            assert torch.equal(grad, expected), name
        else:
            assert_close(grad, expected, dtype)


@pytest.mark.parametrize("want", WANTS, ids="+".join)
@pytest.mark.parametrize("batch,input_size,hidden", [(3, 5, 7), (64, 128, 128)])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_cell_wanted_gradients_equal_the_full_backwards(backend, device, batch, input_size, hidden, want):
    dtype = COMPARE_DTYPE[backend]
    torch.manual_seed(1)
    w_ih, w_hh, b_ih, b_hh = layer_weights(input_size, hidden, 1, dtype, device)[0]
    tensors = [rand(batch, input_size, dtype=dtype, device=device), rand(batch, hidden, dtype=dtype, device=device),
               w_ih, w_hh, b_ih, b_hh]
    grad_out = torch.randn(batch, hidden, dtype=dtype, device=device)

    def fn(*args):
        return gru_cell(*args, backend=backend)

    out_full, full = _grads(fn, tensors, CELL_NAMES, CELL_NAMES, grad_out)
    out, part = _grads(fn, tensors, CELL_NAMES, want, grad_out)
    _check(out.detach(), part, out_full.detach(), full, CELL_NAMES, want, backend, dtype)


@pytest.mark.parametrize("frozen", ["layer0", "all", "w_hh", "h0", "h0+all"])
@pytest.mark.parametrize("time", [1, 7])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_sequence_with_frozen_weights_equals_the_full_backwards(backend, device, time, frozen):
    dtype = COMPARE_DTYPE[backend]
    torch.manual_seed(2)
    layers = layer_weights(6, 9, 2, dtype, device)
    x, h0 = rand(4, time, 6, dtype=dtype, device=device), rand(2, 4, 9, dtype=dtype, device=device)
    flat = [x, h0] + [w for layer in layers for w in layer]
    names = ["x", "h0"] + [f"{kind}{layer}" for layer in range(2) for kind in ("w_ih", "w_hh", "b_ih", "b_hh")]
    frozen_names = {"layer0": {"w_ih0", "w_hh0", "b_ih0", "b_hh0"}, "all": set(names[2:]),
                    "w_hh": {"w_hh0", "w_hh1"}, "h0": {"h0"}, "h0+all": set(names[1:])}[frozen]
    want = tuple(n for n in names if n not in frozen_names)
    grad_out = (torch.randn(4, time, 9, dtype=dtype, device=device), torch.randn(2, 4, 9, dtype=dtype, device=device))

    def fn(x, h0, *weights):
        return gru(x, h0, [weights[0:4], weights[4:8]], num_layers=2, backend=backend)

    out_full, full = _grads(fn, flat, names, names, grad_out)
    out, part = _grads(fn, flat, names, want, grad_out)
    _check(tuple(t.detach() for t in out), part, tuple(t.detach() for t in out_full), full, names, want, backend,
           dtype)


class BackwardCalls(TorchDispatchMode):
    """Records which gradient outputs each call of a backward op is given: None or not, and a list's length (the C++
    nodes of the cell and of session_update call theirs through the dispatcher, where the mode sees them too)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.op.default:
            self.seen.append({k: len(v) if isinstance(v, list) else v is not None for k, v in kwargs.items()
                              if k.startswith("grad_")})
        return func(*args, **kwargs)


@pytest.mark.parametrize("h_wants", [False, True], ids=["h frozen", "h wants"])
@pytest.mark.parametrize("entry", ["cell", "sequence t=1", "sequence t=5"])
def test_the_layer_op_is_given_no_output_for_a_frozen_weight_or_state(entry, h_wants):
    w_ih, w_hh, b_ih, b_hh = layer_weights(3, 4, 1, torch.float32, "cpu")[0]
    w_hh.requires_grad_()
    time = 5 if entry.endswith("5") else 1
    x = torch.randn(2, time, 3, requires_grad=True)
    h = torch.zeros(2, 4, requires_grad=h_wants)
    with BackwardCalls(torch.ops.hiertcn_fast.gru_layer_backward_out) as calls:
        if entry == "cell":
            out = gru_cell(x[:, 0], h, w_ih, w_hh, b_ih, b_hh, backend="cpu")
        else:  # h0 None (zeros, no gradient) where h wants none
            out, _ = gru(x, h[None] if h_wants else None, [(w_ih, w_hh, b_ih, b_hh)], num_layers=1, backend="cpu")
        out.sum().backward()
    assert calls.seen == [dict(grad_x=True, grad_h0=h_wants, grad_w_ih=False, grad_w_hh=True, grad_b_ih=False,
                               grad_b_hh=False)]
    assert x.grad is not None and w_hh.grad is not None and w_ih.grad is None and b_ih.grad is None
    assert (h.grad is not None) == h_wants


@pytest.mark.parametrize("time", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_layer_op_takes_none_for_either_weight_gradient(time, dtype):
    ops = torch.ops.hiertcn_fast
    g = torch.Generator().manual_seed(5)
    batch, input_size, hidden = 3, 5, 4
    x = torch.randn(batch, time, input_size, generator=g, dtype=dtype)
    h0 = torch.randn(batch, hidden, generator=g, dtype=dtype)
    w_ih = torch.randn(3 * hidden, input_size, generator=g, dtype=dtype)
    w_hh = torch.randn(3 * hidden, hidden, generator=g, dtype=dtype)
    b_ih, b_hh = torch.randn(3 * hidden, generator=g, dtype=dtype), torch.randn(3 * hidden, generator=g, dtype=dtype)
    output, gates = torch.empty(batch, time, hidden, dtype=dtype), torch.empty(time, batch, 4 * hidden, dtype=dtype)
    ops.gru_layer_forward_out(x, h0, w_ih, w_hh, b_ih, b_hh, output=output, gates=gates)
    grad_output = torch.randn(batch, time, hidden, generator=g, dtype=dtype)

    def backward(want_ih, want_hh, want_bias, want_h0=True):
        nan = float("nan")
        grads = dict(grad_x=torch.full_like(x, nan), grad_h0=torch.full_like(h0, nan) if want_h0 else None,
                     grad_w_ih=torch.full_like(w_ih, nan) if want_ih else None,
                     grad_w_hh=torch.full_like(w_hh, nan) if want_hh else None,
                     grad_b_ih=torch.full_like(b_ih, nan) if want_bias else None,
                     grad_b_hh=torch.full_like(b_hh, nan) if want_bias else None)
        ops.gru_layer_backward_out(grad_output, x, h0, w_ih, w_hh, output, gates, **grads)
        return grads

    full = backward(True, True, True)
    assert all(torch.isfinite(t).all() for t in full.values())
    for want in [(False, True, True), (True, False, False), (False, False, False), (True, True, True, False),
                 (False, False, False, False)]:
        for name, t in backward(*want).items():
            if t is not None:
                assert torch.equal(t, full[name]), (name, want)
    torch.library.opcheck(ops.gru_layer_backward_out.default, (grad_output, x, h0, w_ih, w_hh, output, gates),
                          dict(grad_x=None, grad_h0=torch.empty_like(h0), grad_w_ih=None,
                               grad_w_hh=torch.empty_like(w_hh), grad_b_ih=None, grad_b_hh=None))
    torch.library.opcheck(ops.gru_layer_backward_out.default, (grad_output, x, h0, w_ih, w_hh, output, gates),
                          dict(grad_x=torch.empty_like(x), grad_h0=None, grad_w_ih=torch.empty_like(w_ih),
                               grad_w_hh=torch.empty_like(w_hh), grad_b_ih=torch.empty_like(b_ih),
                               grad_b_hh=torch.empty_like(b_hh)))


# ---- session_update and session_update_steps: a state, a GRU or a projection that wants no gradient -------------

def _session_inputs(steps, dtype, device, seed):
    """steps None: session_update's arguments; otherwise session_update_steps's over that many steps. Two layers
    with biases and an input projection; some rows of length 0 and some ended (keep 0)."""
    torch.manual_seed(seed)
    batch, time, dim, hidden = 5, 4, 6, 7
    lead = () if steps is None else (steps,)
    items = rand(*lead, batch, time, dim, dtype=dtype, device=device)
    lengths = torch.randint(0, time + 1, (*lead, batch), device=device)
    lengths[..., 0], lengths[..., -1] = 0, time
    keep = (torch.arange(batch, device=device) % 3 != 1).to(dtype).expand(*lead, batch).contiguous()
    h = rand(2, batch, hidden, dtype=dtype, device=device)
    proj = [rand(dim + 1, dim, dtype=dtype, device=device, scale=0.5), rand(dim + 1, dtype=dtype, device=device)]
    flat = [w for layer in layer_weights(dim + 1, hidden, 2, dtype, device) for w in layer]
    return lengths, [items, h, keep, *proj, *flat]


SESSION_NAMES = ("items", "h", "keep", "proj_weight", "proj_bias") + tuple(
    f"{kind}{layer}" for layer in range(2) for kind in ("w_ih", "w_hh", "b_ih", "b_hh"))
# Everything but the state (HierTCN's training: the state comes detached from the cache); the weights alone; a
# frozen GRU (fine-tuning below it); a frozen GRU and projection with the items wanting a gradient, or the state
# alone.
SESSION_WANTS = {"all but h": SESSION_NAMES[:1] + SESSION_NAMES[2:], "weights alone": SESSION_NAMES[3:],
                 "GRU frozen": SESSION_NAMES[:5], "items alone": ("items",), "h alone": ("h",)}


def _session_fn(steps, lengths, backend):
    op = session_update if steps is None else session_update_steps

    def fn(items, h, keep, proj_weight, proj_bias, *flat):
        return op(items, lengths, h, keep, [flat[0:4], flat[4:8]], proj_weight=proj_weight, proj_bias=proj_bias,
                  backend=backend)
    return fn


@pytest.mark.parametrize("want", list(SESSION_WANTS))
@pytest.mark.parametrize("steps", [None, 1, 3], ids=["session_update", "steps=1", "steps=3"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_session_ops_without_the_states_gradient_equal_the_full_backwards(backend, device, steps, want):
    dtype = COMPARE_DTYPE[backend]
    lengths, tensors = _session_inputs(steps, dtype, device, 3)
    fn = _session_fn(steps, lengths, backend)
    grad_out = torch.randn(fn(*tensors).shape, dtype=dtype, device=device)
    out_full, full = _grads(fn, tensors, SESSION_NAMES, SESSION_NAMES, grad_out)
    out, part = _grads(fn, tensors, SESSION_NAMES, SESSION_WANTS[want], grad_out)
    _check(out.detach(), part, out_full.detach(), full, SESSION_NAMES, SESSION_WANTS[want], backend, dtype)


@pytest.mark.parametrize("want", ["all", "all but h", "GRU frozen", "items alone", "h alone"])
@pytest.mark.parametrize("steps", [None, 3], ids=["session_update", "steps=3"])
def test_the_session_ops_are_given_only_the_gradient_outputs_wanted(steps, want):
    lengths, tensors = _session_inputs(steps, torch.float32, "cpu", 4)
    wanted = SESSION_NAMES if want == "all" else SESSION_WANTS[want]
    tensors = [t.requires_grad_(name in wanted) for t, name in zip(tensors, SESSION_NAMES)]
    ops = torch.ops.hiertcn_fast
    with BackwardCalls(ops.session_update_backward_out if steps is None
                       else ops.session_update_steps_backward_out) as calls:
        _session_fn(steps, lengths, "cpu")(*tensors).sum().backward()
    expected = dict(grad_item_embeddings="items" in wanted, grad_h="h" in wanted,
                    grad_weights=8 if "w_ih0" in wanted else 0, grad_proj_weight="proj_weight" in wanted,
                    grad_proj_bias="proj_bias" in wanted)
    if steps is not None:
        expected["grad_keep"] = "keep" in wanted
    assert calls.seen == [expected]
    for name, t in zip(SESSION_NAMES, tensors):
        assert (t.grad is not None) == (name in wanted), name


@pytest.mark.parametrize("steps", [None, 3], ids=["session_update", "steps=3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_session_ops_take_none_for_what_wants_no_gradient(steps, dtype):
    ops = torch.ops.hiertcn_fast
    lengths, (items, h, keep, pw, pb, *flat) = _session_inputs(steps, dtype, "cpu", 5)
    items = items.contiguous()
    batch, dim, hidden = h.shape[1], items.shape[-1], h.shape[2]
    lead = () if steps is None else (steps,)
    saved = dict(session_mean=torch.empty(*lead, batch, dim, dtype=dtype),
                 projected=torch.empty(*lead, batch, dim + 1, dtype=dtype))
    if steps is None:
        saved.update(out=torch.empty_like(h), states=torch.empty_like(h), gates=torch.empty(2, batch, 4 * hidden,
                                                                                            dtype=dtype))
        ops.session_update_forward_out(items, lengths, h, keep, flat, pw, pb, **saved)
        grad_out = torch.randn_like(h)
        op = ops.session_update_backward_out
        args = (grad_out, items, lengths, h, keep, flat, pw, saved["session_mean"], saved["projected"],
                saved["states"], saved["gates"])
    else:
        saved.update(out=torch.empty(steps + 1, *h.shape, dtype=dtype), cells=torch.empty(2, steps, batch, hidden,
                                                                                          dtype=dtype),
                     gates=torch.empty(2, steps, batch, 4 * hidden, dtype=dtype))
        ops.session_update_steps_forward_out(items, lengths, h, keep, flat, pw, pb, **saved)
        grad_out = torch.randn_like(saved["out"])
        op = ops.session_update_steps_backward_out
        args = (grad_out, items, lengths, keep, flat, pw, saved["session_mean"], saved["projected"], saved["out"],
                saved["cells"], saved["gates"])

    def backward(*dropped):
        nan = float("nan")
        grads = dict(grad_item_embeddings=torch.full_like(items, nan), grad_h=torch.full_like(h, nan),
                     grad_weights=[torch.full_like(t, nan) for t in flat], grad_proj_weight=torch.full_like(pw, nan),
                     grad_proj_bias=torch.full_like(pb, nan))
        if steps is not None:
            grads["grad_keep"] = torch.full_like(keep, nan)
        grads.update({name: [] if name == "grad_weights" else None for name in dropped})
        op(*args, **grads)
        return grads

    full = backward()
    assert all(torch.isfinite(t).all() for v in full.values() for t in (v if isinstance(v, list) else [v]))
    for dropped in [("grad_h",), ("grad_weights",), ("grad_weights", "grad_proj_weight", "grad_proj_bias"),
                    ("grad_item_embeddings", "grad_proj_weight"), ("grad_item_embeddings", "grad_proj_weight",
                                                                   "grad_proj_bias", "grad_weights")]:
        part = backward(*dropped)
        for name, value in part.items():
            if name in dropped:
                assert value in (None, []), name
            elif name == "grad_weights":
                assert all(torch.equal(a, b) for a, b in zip(value, full[name], strict=True)), dropped
            else:
                assert torch.equal(value, full[name]), (name, dropped)
    for dropped in [("grad_h",), ("grad_weights", "grad_proj_weight", "grad_item_embeddings")]:
        grads = dict(grad_item_embeddings=torch.empty_like(items), grad_h=torch.empty_like(h),
                     grad_weights=[torch.empty_like(t) for t in flat], grad_proj_weight=torch.empty_like(pw),
                     grad_proj_bias=torch.empty_like(pb))
        if steps is not None:
            grads["grad_keep"] = torch.empty_like(keep)
        grads.update({name: [] if name == "grad_weights" else None for name in dropped})
        torch.library.opcheck(op.default, args, grads)
    grads = dict(grad_item_embeddings=None, grad_h=None, grad_weights=[torch.empty_like(flat[0])],
                 grad_proj_weight=None, grad_proj_bias=None)
    if steps is not None:
        grads["grad_keep"] = None
    with pytest.raises(RuntimeError, match="grad_weights must match weights one to one, or be empty"):
        op(*args, **grads)
