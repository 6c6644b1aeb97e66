"""The GRU ops' backward computes only the weight gradients that are wanted: a frozen w_ih or w_hh costs no
product, a frozen bias pair no sum. What is computed must be what the full backward gives, on every backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hiertcn_fast.ops import gru, gru_cell
from gru_helpers import layer_weights
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, assert_close, rand

CELL_NAMES = ("x", "h", "w_ih", "w_hh", "b_ih", "b_hh")
# Which of the cell's arguments want a gradient: a frozen cell over data (x and h only), the input side frozen,
# the state side frozen, the weights frozen with trainable biases, and one bias of the pair alone.
WANTS = [("x", "h"), ("h", "w_hh", "b_hh"), ("x", "w_ih", "b_ih"), ("h", "b_ih", "b_hh"), ("x", "b_hh"),
         ("w_ih",)]


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


@pytest.mark.parametrize("frozen", ["layer0", "all", "w_hh"])
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
                    "w_hh": {"w_hh0", "w_hh1"}}[frozen]
    want = tuple(n for n in names if n not in frozen_names)
    grad_out = (torch.randn(4, time, 9, dtype=dtype, device=device), torch.randn(2, 4, 9, dtype=dtype, device=device))

    def fn(x, h0, *weights):
        return gru(x, h0, [weights[0:4], weights[4:8]], num_layers=2, backend=backend)

    out_full, full = _grads(fn, flat, names, names, grad_out)
    out, part = _grads(fn, flat, names, want, grad_out)
    _check(tuple(t.detach() for t in out), part, tuple(t.detach() for t in out_full), full, names, want, backend,
           dtype)


class LayerBackwardCalls(TorchDispatchMode):
    """Records which gradient outputs each call of the GRU layer's backward op is given (the C++ cell's node calls
    it through the dispatcher, where the mode sees it too)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.hiertcn_fast.gru_layer_backward_out.default:
            self.seen.append({k: v is not None for k, v in kwargs.items() if k.startswith("grad_")})
        return func(*args, **kwargs)


@pytest.mark.parametrize("entry", ["cell", "sequence t=1", "sequence t=5"])
def test_the_layer_op_is_given_no_output_for_a_frozen_weight(entry):
    w_ih, w_hh, b_ih, b_hh = layer_weights(3, 4, 1, torch.float32, "cpu")[0]
    w_hh.requires_grad_()
    time = 5 if entry.endswith("5") else 1
    x = torch.randn(2, time, 3, requires_grad=True)
    with LayerBackwardCalls() as calls:
        if entry == "cell":
            out = gru_cell(x[:, 0], torch.zeros(2, 4), w_ih, w_hh, b_ih, b_hh, backend="cpu")
        else:
            out, _ = gru(x, None, [(w_ih, w_hh, b_ih, b_hh)], num_layers=1, backend="cpu")
        out.sum().backward()
    assert calls.seen == [dict(grad_x=True, grad_h0=True, grad_w_ih=False, grad_w_hh=True, grad_b_ih=False,
                               grad_b_hh=False)]
    assert x.grad is not None and w_hh.grad is not None and w_ih.grad is None and b_ih.grad is None


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

    def backward(want_ih, want_hh, want_bias):
        nan = float("nan")
        grads = dict(grad_x=torch.full_like(x, nan), grad_h0=torch.full_like(h0, nan),
                     grad_w_ih=torch.full_like(w_ih, nan) if want_ih else None,
                     grad_w_hh=torch.full_like(w_hh, nan) if want_hh else None,
                     grad_b_ih=torch.full_like(b_ih, nan) if want_bias else None,
                     grad_b_hh=torch.full_like(b_hh, nan) if want_bias else None)
        ops.gru_layer_backward_out(grad_output, x, h0, w_ih, w_hh, output, gates, **grads)
        return grads

    full = backward(True, True, True)
    assert all(torch.isfinite(t).all() for t in full.values())
    for want in [(False, True, True), (True, False, False), (False, False, False)]:
        for name, t in backward(*want).items():
            if t is not None:
                assert torch.equal(t, full[name]), (name, want)
    torch.library.opcheck(ops.gru_layer_backward_out.default, (grad_output, x, h0, w_ih, w_hh, output, gates),
                          dict(grad_x=None, grad_h0=torch.empty_like(h0), grad_w_ih=None,
                               grad_w_hh=torch.empty_like(w_hh), grad_b_ih=None, grad_b_hh=None))
