"""Fixes from the audits of the GRU ops, the sequence causal_conv1d and the nn GRU drop-in (session 34). Each test
failed on c83862f.

Forward-mode AD on auto is tested in test_backends_differential.py (with the other torch.func cases).
"""

import re

import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast import ops
from hiertcn_fast.nn import TCN, CausalConv1d
from hiertcn_fast.ops import CausalConvState, causal_conv1d, causal_conv1d_step, tcn_step

D = torch.float64


def _gru_weights(inputs, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 * hidden, inputs, generator=g, dtype=D) * 0.4,
            torch.randn(3 * hidden, hidden, generator=g, dtype=D) * 0.4,
            torch.randn(3 * hidden, generator=g, dtype=D) * 0.1,
            torch.randn(3 * hidden, generator=g, dtype=D) * 0.1]


# ---- session lengths out of range under torch.compile -------------------------------------------------------------

def _session_calls(backend):
    B, T, dim, H = 3, 4, 3, 5
    weights = [_gru_weights(dim, H)]
    h, keep = torch.randn(1, B, H, dtype=D), torch.ones(B, dtype=D)

    def one(items, lengths):
        return ops.session_update(items, lengths, h, keep, weights, backend=backend)

    def steps(items, lengths):
        return ops.session_update_steps(items[None], lengths[None], h, keep[None], weights, backend=backend)
    return torch.randn(B, T, dim, dtype=D), {"session_update": one, "session_update_steps": steps}


@pytest.mark.parametrize("op", ["session_update", "session_update_steps"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_session_ops_refuse_lengths_out_of_range(op, backend):
    """The compiled reference took lengths 7 (of time 4) as 4 and -3 as 0 without a word, where eager and the cpu
    kernel refuse them: the graph now asserts the range (a RuntimeError when it runs)."""
    items, calls = _session_calls(backend)
    fn = calls[op]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    good = torch.tensor([0, 4, 2])
    torch.testing.assert_close(compiled(items, good), fn(items, good))
    for bad in ([0, 7, 2], [0, -3, 2]):
        with pytest.raises((RuntimeError, ValueError), match=r"lengths must lie in \[0, time"):
            compiled(items, torch.tensor(bad))
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, time = 4\]"):
            fn(items, torch.tensor(bad))


# ---- malformed weights ----------------------------------------------------------------------------------------------

def test_malformed_gru_weights_are_named():
    """None, an iterator, a dict, a tensor or None as a layer gave "object of type 'NoneType' has no len()" and the
    like; without h0, a forgotten level of nesting was blamed on a w_hh that was a row of w_ih."""
    x, h0 = torch.randn(2, 3, 4, dtype=D), torch.randn(1, 2, 5, dtype=D)
    w = _gru_weights(4, 5)
    layer_list = r"weights must be a list or tuple of one \(w_ih, w_hh\[, b_ih, b_hh\]\) sequence per layer"
    for bad, got in ((None, "NoneType"), (iter([w]), "list_iterator"), ({0: w}, "dict"), (w[0], "a tensor")):
        for given in (h0, None):
            with pytest.raises(TypeError, match=rf"{layer_list} \(num_layers=1\), got {got}"):
                ops.gru(x, given, bad, num_layers=1)
    for bad, got in (([None], "NoneType"), ([w[0]], "a tensor"), ([iter(w)], "list_iterator")):
        for given in (h0, None):
            with pytest.raises(TypeError, match=rf"weights\[0\] must be a list or tuple .*got {got}"):
                ops.gru(x, given, bad, num_layers=1)
    for given in (h0, None):  # the layer not nested: the same words with h0 and without
        with pytest.raises(ValueError, match=r"one \(w_ih, w_hh\[, b_ih, b_hh\]\) sequence per layer "
                                             r"\(num_layers=1\), got 4"):
            ops.gru(x, given, w, num_layers=1)
    items, calls = _session_calls("cpu")
    with pytest.raises(TypeError, match=rf"{layer_list} \(num_layers=1\), got NoneType"):
        ops.session_update(items, torch.tensor([1, 2, 3]), h0[:, :1].expand(1, 3, 5).contiguous(), torch.ones(3, dtype=D),
                           None)
    with pytest.raises(TypeError, match=rf"{layer_list} \(num_layers=1\), got NoneType"):
        ops.session_update_steps(items[None], torch.tensor([[1, 2, 3]]), torch.zeros(1, 3, 5, dtype=D),
                                 torch.ones(1, 3, dtype=D), None)
    # A tuple of layers and a ParameterList still work, and give what a list gives.
    want = ops.gru(x, h0, [w], num_layers=1)[0]
    torch.testing.assert_close(ops.gru(x, h0, ((tuple(w)),), num_layers=1)[0], want)
    params = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in w])
    torch.testing.assert_close(ops.gru(x, h0, [params], num_layers=1)[0], want)


# ---- batched gradients through the kernels ----------------------------------------------------------------------

def _grad_cases():
    torch.manual_seed(3)
    B, dim, H = 3, 4, 5
    x, h = torch.randn(B, dim, dtype=D), torch.randn(B, H, dtype=D)
    w_ih, w_hh, b_ih, b_hh = _gru_weights(dim, H)
    gi, gh = torch.randn(B, 3 * H, dtype=D), torch.randn(B, 3 * H, dtype=D)
    items, lengths, keep = torch.randn(B, 6, dim, dtype=D), torch.tensor([1, 0, 6]), torch.ones(B, dtype=D)
    conv_w, ctx, ctx_w = torch.randn(6, dim, 3, dtype=D), torch.randn(B, 2, dtype=D), torch.randn(6, 2, 3, dtype=D)
    seq = torch.randn(B, 7, dim, dtype=D)
    return {
        "gru_gates": (lambda v, be: ops.gru_gates(gi, gh, v, backend=be), h),
        "gru_cell": (lambda v, be: ops.gru_cell(x, v, w_ih, w_hh, b_ih, b_hh, backend=be), h),
        "gru": (lambda v, be: ops.gru(seq, v[None], [(w_ih, w_hh, b_ih, b_hh)], num_layers=1, backend=be)[0], h),
        "session_update": (lambda v, be: ops.session_update(items, lengths, v[None], keep, [(w_ih, w_hh)],
                                                            backend=be), h),
        "session_update_steps": (lambda v, be: ops.session_update_steps(items[None], lengths[None], v[None],
                                                                        keep[None], [(w_ih, w_hh)], backend=be), h),
        "causal_conv1d": (lambda v, be: causal_conv1d(v, conv_w, context=ctx, context_weight=ctx_w, activation="gelu",
                                                      backend=be), seq),
    }


@pytest.mark.parametrize("op", list(_grad_cases()))
@pytest.mark.parametrize("backend", [None, "cpu"])
def test_a_batched_gradient_through_the_kernels_is_refused_in_words(op, backend):
    """is_grads_batched=True reached the kernels' out ops: "Batching rule not implemented for
    hiertcn_fast::gru_layer_backward_out; the fallback path doesn't work on out= or view ops". Now the op's own
    words, naming the reference backend, which takes it and equals the unbatched gradients."""
    fn, primal = _grad_cases()[op]
    primal = primal.clone().requires_grad_()
    out = fn(primal, backend)
    vectors = torch.randn(2, *out.shape, dtype=D)
    with pytest.raises(RuntimeError, match=rf"{op}: its backward runs fused kernels, which take no batched "
                                           r"gradient.*backend='reference'"):
        torch.autograd.grad(out, primal, vectors, is_grads_batched=True)
    out = fn(primal, "reference")
    batched, = torch.autograd.grad(out, primal, vectors, is_grads_batched=True, retain_graph=True)
    for i in range(2):  # the unbatched gradients, from the kernels
        row, = torch.autograd.grad(fn(primal, backend), primal, vectors[i])
        torch.testing.assert_close(batched[i], row)


# ---- inference tensors beside one that requires grad -----------------------------------------------------------

def test_gru_gates_takes_inference_inputs_beside_a_state_that_requires_grad():
    """The cpu backend saved gi and gh themselves ("Inference tensors cannot be saved for backward"); the reference
    took them. Both now give the same gradient."""
    torch.manual_seed(2)
    with torch.inference_mode():
        gi, gh = torch.randn(3, 12, dtype=D), torch.randn(3, 12, dtype=D)
    grads = {}
    for backend in ("cpu", "reference"):
        h = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_()
        ops.gru_gates(gi, gh, h, backend=backend).square().sum().backward()
        grads[backend] = h.grad
    torch.testing.assert_close(grads["cpu"], grads["reference"])
    assert gi.is_inference() and gh.is_inference()


# ---- torch.func through a conv with a context ------------------------------------------------------------------

def test_torch_func_grad_through_a_conv_with_context_with_respect_to_x_or_the_weight():
    """With a context, torch.func.grad with respect to x, the weight or the bias (the context and its weight
    requiring nothing) failed: "Cannot access data pointer of Tensor that doesn't have storage" (the cached context
    packing keyed a transform's wrapped tensor by its data pointer)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 4, dtype=D), torch.randn(5, 4, 3, dtype=D), torch.randn(5, dtype=D)
    c, cw = torch.randn(2, 3, dtype=D), torch.randn(5, 3, 3, dtype=D)

    def peer(x, w, b):  # F.conv1d over the left-padded concatenation of x and the context at every step
        inp = torch.cat([x, c[:, None].expand(-1, x.shape[1], -1)], 2).transpose(1, 2)
        return F.conv1d(F.pad(inp, (2, 0)), torch.cat([w, cw], 1), b).transpose(1, 2).tanh()

    for backend in (None, "reference"):
        def ours(x, w, b):
            return causal_conv1d(x, w, b, context=c, context_weight=cw, activation="tanh", backend=backend)
        for arg in range(3):
            got = torch.func.grad(lambda *a: ours(*a).square().sum(), argnums=arg)(x, w, b)
            want = torch.func.grad(lambda *a: peer(*a).square().sum(), argnums=arg)(x, w, b)
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.func.jacrev(ours)(x, w, b), torch.func.jacrev(peer)(x, w, b))
    tcn = TCN(4, [5, 5], 3, context_channels=3).double()
    got = torch.func.grad(lambda v: tcn(v, c).sum())(x)
    xr = x.clone().requires_grad_()
    tcn(xr, c).sum().backward()
    torch.testing.assert_close(got, xr.grad)


# ---- errors in words ------------------------------------------------------------------------------------------

def test_conv_errors_name_the_mistake():
    x, w = torch.randn(2, 4, 5), torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match=r"x must be \(batch, time, in_channels = 4\), channels-last, for this "
                                         r"weight; got shape \(2, 4, 5\).*pass x.transpose\(1, 2\)"):
        causal_conv1d(x, w)
    causal_conv1d(x.transpose(1, 2), w)  # the hint's fix
    with pytest.raises(ValueError, match=r"weight \(out_channels, in_channels / groups, k\) must have 3 input"):
        causal_conv1d(torch.randn(2, 5, 3), w)  # not channels-first: the weight is named, as before
    for bad in (["relu"], 1, torch.nn.ReLU()):
        with pytest.raises(TypeError, match=r"activation must be None or one of \('relu', 'gelu', 'tanh'\), got "):
            causal_conv1d(x.transpose(1, 2), w, activation=bad)
        with pytest.raises(TypeError, match="activation must be None or one of"):
            CausalConv1d(4, 6, 3, activation=bad)
        with pytest.raises(TypeError, match="activation must be None or one of"):
            causal_conv1d_step(torch.randn(2, 4), w, CausalConvState.zeros(2, 4, 3, 1), activation=bad)
        with pytest.raises(TypeError, match="activation must be None or one of"):
            tcn_step(torch.randn(2, 4), [torch.randn(4, 4, 3)], [None], [CausalConvState.zeros(2, 4, 3, 1)],
                     activation=bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(x.transpose(1, 2), w, activation="ReLU")
    with pytest.raises(TypeError, match=r"channels must be a sequence with one int per block \(e.g. \[64, 64, 64\]\), "
                                        r"got int 5"):
        TCN(4, 5, 3)
    with pytest.raises(TypeError, match=r"dilations must be a sequence with one int per block .*got int 3"):
        TCN(4, [5], dilations=3)
    assert len(TCN(4, (5, 5), 3, dilations=range(1, 3)).blocks) == 2  # any iterable of ints, as before


def test_gru_names_a_packed_sequence_whose_data_is_not_2d():
    """3-D packed data was told as "x must be 3-D, got shape (2, 3, 2, 3)" (the padded copy), 1-D data as a width
    mismatch; torch says "input must have 2 dimensions"."""
    from torch.nn.utils.rnn import PackedSequence, pack_sequence

    from hiertcn_fast.nn import GRU
    three = pack_sequence([torch.randn(3, 2, 3), torch.randn(2, 2, 3)])
    one = PackedSequence(torch.randn(5), torch.tensor([2, 2, 1]))
    for packed, width in ((three, 3), (one, 1)):
        with pytest.raises(ValueError, match=re.escape("GRU: a PackedSequence's data must be 2-D (packed steps, "
                                                       f"input_size), got shape {tuple(packed.data.shape)}")):
            GRU(width, 4)(packed)
        with pytest.raises(RuntimeError, match="input must have 2 dimensions"):  # the peer refuses it too
            torch.nn.GRU(width, 4)(packed)
    two = pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])
    ours, peer = GRU(3, 4), torch.nn.GRU(3, 4)
    ours.load_state_dict(peer.state_dict())
    torch.testing.assert_close(ours(two)[0].data, peer(two)[0].data)
