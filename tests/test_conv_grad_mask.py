"""causal_conv1d's backward computes only the gradients that are wanted: an x that needs no gradient (a TCN's
first layer over data, not embeddings) costs no input-gradient conv, and a frozen weight no weight-gradient
product. What is computed must be what the full backward gives, on every backend and both cpu routes."""

import pytest
import torch

from hiertcn_fast.ops import causal_conv1d
from hiertcn_fast.ops import conv as conv_ops
from conv_helpers import ConvCase
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, assert_close, conv_blas

CASES = [
    # dense, big enough for the cpu backend's BLAS route (>= 32 channels), with context, relu's sign bits, residual
    ConvCase(3, 29, 36, 40, 5, 2, context_channels=5, activation="relu", residual=True),
    # dense and small (the micro-kernels on every route), tanh whose backward keeps the output
    ConvCase(2, 13, 6, 10, 3, 2, activation="tanh", residual=True),
    # depthwise, gelu, no bias
    ConvCase(2, 17, 12, 12, 4, 3, groups=12, activation="gelu", residual=True, bias=False),
    # grouped, no activation, several weight-gradient chunks on the kernels' backends
    ConvCase(2, 301, 6, 4, 3, 5, groups=2),
]

# Which of the arguments want a gradient (the others are plain tensors): x alone, the weight alone, neither of the
# two (the bias and context still do), and the weight with the bias (a TCN's first layer over data).
WANTS = [("x",), ("weight",), ("bias", "context", "context_weight", "residual"), ("weight", "bias", "context_weight")]


def _backward(args, want, backend, grad_out):
    call = {k: (v.detach().clone().requires_grad_(k in want) if torch.is_tensor(v) else v) for k, v in args.items()}
    out = causal_conv1d(**call, backend=backend)
    out.backward(grad_out)
    return out.detach(), {k: call[k].grad for k in args if torch.is_tensor(args[k])}


# Each backend, the cpu one on both of its routes for dense layers (the BLAS one and the micro-kernels).
BACKEND_ROUTES = [pytest.param(*p.values, route, id=f"{p.id}-{route}", marks=p.marks)
                  for p in BACKEND_DEVICES for route in (("always", "never") if p.values[0] == "cpu" else ("auto",))]


@pytest.mark.parametrize("want", WANTS, ids="+".join)
@pytest.mark.parametrize("backend,device,route", BACKEND_ROUTES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_wanted_gradients_equal_the_full_backwards(case, backend, device, route, want):
    dtype = COMPARE_DTYPE[backend]
    torch.manual_seed(0)
    args = case.inputs(dtype, device)
    grad_out = torch.randn(case.batch, case.time, case.out_channels, dtype=dtype, device=device)
    with conv_blas(route):
        out_full, full = _backward(args, tuple(k for k in args if torch.is_tensor(args[k])), backend, grad_out)
        out, part = _backward(args, want, backend, grad_out)
    if backend == "reference":  # torch's own ops, whose paths may depend on what wants a gradient
        assert_close(out, out_full, dtype)
    else:
        assert torch.equal(out, out_full)
    for name, grad in part.items():
        if name not in want:
            assert grad is None, name
            continue
        assert grad is not None, name
        if backend == "reference":  # torch's own backward, whose products may take other paths
            assert_close(grad, full[name], dtype)
        else:  # the same kernels on the same inputs: the same bits
            assert torch.equal(grad, full[name]), name


@pytest.mark.parametrize("residual_is_x", [False, True])
@pytest.mark.parametrize("x_grad,weight_grad", [(True, True), (True, False), (False, True), (False, False)])
def test_the_kernels_are_given_no_output_for_a_gradient_not_wanted(monkeypatch, x_grad, weight_grad, residual_is_x):
    seen = []
    kernel = conv_ops._backward_kernel

    def spy(name, grad_out, x, weight, pre, residual, dilation, groups, activation, grad_pre, grad_x, grad_weight,
            grad_residual):
        seen.append((grad_x is not None, grad_weight is not None))
        kernel(name, grad_out, x, weight, pre, residual, dilation, groups, activation, grad_pre, grad_x, grad_weight,
               grad_residual)

    monkeypatch.setattr(conv_ops, "_backward_kernel", spy)
    x = torch.randn(2, 9, 8, requires_grad=x_grad)
    weight = torch.randn(8, 8, 3, requires_grad=weight_grad)
    bias = torch.randn(8, requires_grad=True)  # always a gradient to compute
    out = causal_conv1d(x, weight, bias, dilation=2, activation="relu", residual=x if residual_is_x else None,
                        backend="cpu")
    out.sum().backward()
    assert seen == [(x_grad, weight_grad)]
    assert (x.grad is not None) == x_grad and (weight.grad is not None) == weight_grad and bias.grad is not None


@pytest.mark.parametrize("route", ["always", "never"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_op_takes_none_for_grad_x_or_grad_weight(route, groups, dtype):
    ops = torch.ops.hiertcn_fast
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 23, 40, generator=g, dtype=dtype)
    weight = torch.randn(40, 40 // groups, 4, generator=g, dtype=dtype)
    grad_out = torch.randn(3, 23, 40, generator=g, dtype=dtype)
    pre = torch.randn(3, 23, 40, generator=g, dtype=dtype)

    def backward(want_x, want_weight):
        grads = dict(grad_pre=torch.full_like(grad_out, float("nan")),
                     grad_x=torch.full_like(x, float("nan")) if want_x else None,
                     grad_weight=torch.full_like(weight, float("nan")) if want_weight else None, grad_residual=None)
        with conv_blas(route):
            ops.causal_conv1d_backward_out(grad_out, x, weight, pre, None, 3, groups, 3, **grads)
        return grads

    full = backward(True, True)
    assert all(torch.isfinite(t).all() for t in full.values() if t is not None)
    for want_x, want_weight in [(True, False), (False, True), (False, False)]:
        part = backward(want_x, want_weight)
        for name, t in part.items():
            if t is not None:
                assert torch.equal(t, full[name]), (name, want_x, want_weight)
    if groups == 1 and dtype == torch.float32:
        torch.library.opcheck(ops.causal_conv1d_backward_out.default, (grad_out, x, weight, pre, None, 3, groups, 3),
                              dict(grad_pre=torch.empty_like(grad_out), grad_x=None, grad_weight=torch.empty_like(weight),
                                   grad_residual=None))
        torch.library.opcheck(ops.causal_conv1d_backward_out.default, (grad_out, x, weight, pre, None, 3, groups, 3),
                              dict(grad_pre=torch.empty_like(grad_out), grad_x=torch.empty_like(x), grad_weight=None,
                                   grad_residual=None))


def test_a_wrong_shaped_optional_gradient_is_still_refused():
    ops = torch.ops.hiertcn_fast
    x, weight, grad_out = torch.randn(2, 5, 4), torch.randn(3, 4, 2), torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="grad_weight"):
        ops.causal_conv1d_backward_out(grad_out, x, weight, None, None, 1, 1, 0, grad_pre=torch.empty(2, 5, 3),
                                       grad_x=None, grad_weight=torch.empty(3, 4, 3), grad_residual=None)
    with pytest.raises(RuntimeError, match="grad_x"):
        ops.causal_conv1d_backward_out(grad_out, x, weight, None, None, 1, 1, 0, grad_pre=torch.empty(2, 5, 3),
                                       grad_x=torch.empty(2, 5, 3), grad_weight=None, grad_residual=None)
