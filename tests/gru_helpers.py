"""Helpers for the GRU family's tests: torch.nn peers carrying given weights, and gradient comparison."""

import torch
import torch.nn.functional as F

from helpers import assert_close, rand


def layer_weights(input_size, hidden, num_layers, dtype, device, bias=True, noncontiguous=False):
    """Per-layer [w_ih, w_hh(, b_ih, b_hh)] in nn.GRU's layout; w_ih strided when noncontiguous."""
    layers = []
    scale = hidden ** -0.5  # nn.GRU's initialisation range: pre-activations of order 1, no saturation
    for layer in range(num_layers):
        in_features = input_size if layer == 0 else hidden
        w_ih = rand(3 * hidden, in_features, dtype=dtype, device=device, noncontiguous=noncontiguous, scale=scale)
        w_hh = rand(3 * hidden, hidden, dtype=dtype, device=device, scale=scale)
        biases = [rand(3 * hidden, dtype=dtype, device=device, scale=scale) for _ in range(2)] if bias else []
        layers.append([w_ih, w_hh, *biases])
    return layers


def leaves(tensors):
    """Fresh leaves that keep the tensors' values and strides (integer tensors pass through)."""
    return [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]


def torch_gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch.nn.GRUCell's own computation (the independent peer)."""
    return torch._VF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


def torch_gru(x, h0, layers):
    """torch.nn.GRU(batch_first=True) with these weights: (output, h_n)."""
    module = torch.nn.GRU(x.shape[2], h0.shape[2], num_layers=len(layers), bias=len(layers[0]) == 4,
                          batch_first=True, device=x.device, dtype=x.dtype)
    names = [name for names in module._all_weights for name in names]
    params = dict(zip(names, [t for layer in layers for t in layer]))
    return torch.func.functional_call(module, params, (x, h0))


def session_update_composition(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    """HierTCN's session update written with torch ops and nn.GRUCell, step by step."""
    in_session = (torch.arange(items.shape[1], device=items.device) < lengths[:, None]).to(items.dtype)
    mean = (items * in_session[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(items.dtype)
    x = F.linear(mean, proj_weight, proj_bias) if proj_weight is not None else mean
    states = []
    for layer, weights in enumerate(layers):
        x = torch_gru_cell(x, h[layer], *weights)
        states.append(x)
    kept = torch.where((lengths > 0)[None, :, None], torch.stack(states), h)
    return kept * keep.to(h.dtype)[None, :, None]


def assert_outputs_and_grads_match(fn, peer, inputs, dtype):
    """fn and peer (float64) give the same outputs and the same gradients w.r.t. every input."""
    mine_leaves = leaves(inputs)
    peer_leaves = leaves([t.detach().double() if t.is_floating_point() else t for t in inputs])
    mine, theirs = fn(*mine_leaves), peer(*peer_leaves)
    mine, theirs = (mine if isinstance(mine, tuple) else (mine,)), (theirs if isinstance(theirs, tuple) else (theirs,))
    grads_out = [torch.randn_like(t) for t in theirs]
    for a, b in zip(mine, theirs):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype)
    mine_leaves = [t for t in mine_leaves if t.requires_grad]
    peer_leaves = [t for t in peer_leaves if t.requires_grad]
    mine_grads = torch.autograd.grad(mine, mine_leaves, [g.to(dtype) for g in grads_out], allow_unused=True)
    peer_grads = torch.autograd.grad(theirs, peer_leaves, grads_out, allow_unused=True)
    for index, (a, b) in enumerate(zip(mine_grads, peer_grads)):
        assert (a is None) == (b is None), f"gradient {index}: one side has none"
        if a is not None:
            assert_close(a, b, dtype)
