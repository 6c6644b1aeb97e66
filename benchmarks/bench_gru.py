"""The GRU family against torch.nn: gru_cell vs nn.GRUCell, our nn.GRUCell and nn.GRU.step vs torch's modules one step
at a time, gru vs nn.GRU (cuDNN on a GPU, PyTorch's
own kernels on the CPU), session_update vs its composition from torch ops, session_update_steps (a lane
batch's 10 session steps in one op) vs that composition step by step and vs session_update step by step;
torch.compile where it applies. HierTCN's shapes: batch 32..256 lanes, hidden 128, 2 layers, sessions of up to 20 items.

    python -m pytest benchmarks/bench_gru.py            (quick matrix; HIERTCN_BENCH_FULL=1 for all)
"""

import torch
import torch.nn.functional as F

import harness
from hiertcn_fast.nn import GRU, GRUCell
from hiertcn_fast.ops import gru, gru_cell, session_update, session_update_steps


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _element(dtype):
    return torch.finfo(dtype).bits // 8


def _run(fn, leaves, backward):
    """fn() under no_grad for a forward-only variant (with grad mode on, a composition of torch ops would record
    an autograd graph that inference never needs); forward then gradients w.r.t. every leaf otherwise."""
    if not backward:
        def forward():
            with torch.no_grad():
                return fn()
        return forward

    def forward_backward():  # the outputs too, so that the same-result check compares them as well
        out = fn()
        outputs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs])
        return (*(o.detach() for o in outputs), *grads)

    return forward_backward


# ---- cell ----------------------------------------------------------------------------------------

WITH_COMPILE = ("hiertcn_fast", "torch eager", "torch.compile")
WITHOUT_COMPILE = ("hiertcn_fast", "torch eager")


def _variants(quick, hiertcn_shape):
    """torch.compile costs seconds per case to build: in the quick matrix only at HierTCN's shape."""
    return WITH_COMPILE if hiertcn_shape or not quick else WITHOUT_COMPILE


def _cell_maker(batch, hidden, dtype, device, backward, variants, frozen=False, detached=False):
    """frozen: the cell's weights want no gradient (only x's and h's are computed, by every variant alike);
    detached: h wants none (a state carried over detached, or a zero start)."""
    def make():
        cell = torch.nn.GRUCell(hidden, hidden, device=device, dtype=dtype).requires_grad_(not frozen)
        x = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=backward)
        h = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=backward and not detached)
        leaves = [x] + ([] if detached else [h]) + ([] if frozen else list(cell.parameters()))
        weights = list(cell.parameters())
        made = {"hiertcn_fast": _run(lambda: gru_cell(x, h, *weights), leaves, backward),
                "torch eager": _run(lambda: cell(x, h), leaves, backward)}
        if "torch.compile" in variants:
            compiled = torch.compile(cell)
            made["torch.compile"] = _run(lambda: compiled(x, h), leaves, backward)
        return made

    return make


def _cell_cases(device, quick):
    dtype = _dtype(device)
    shapes = ([(1, 128), (32, 128), (256, 128), (1024, 256)] if quick else
              [(batch, hidden) for hidden in (128, 256, 512) for batch in (1, 32, 256, 1024)])
    cases = []
    for batch, hidden in shapes:
        matmul_flops = 2 * batch * (2 * hidden) * 3 * hidden
        weight_bytes = 2 * 3 * hidden * hidden * _element(dtype)
        act_bytes = batch * hidden * 3 * _element(dtype)
        variants = _variants(quick, (batch, hidden) == (256, 128))
        for backward in (False, True):
            cases.append(harness.Case(
                "gru_cell", f"b={batch} h={hidden} {'fwd+bwd' if backward else 'fwd'}",
                _cell_maker(batch, hidden, dtype, device, backward, variants),
                flops=matmul_flops * (3 if backward else 1),
                bytes=(weight_bytes + act_bytes) * (3 if backward else 1), dtype=dtype, variants=variants))
    # A frozen cell at HierTCN's shape: the backward skips the two weight-gradient products (and the bias sums).
    batch, hidden = 256, 128
    cases.append(harness.Case(
        "gru_cell", f"b={batch} h={hidden} frozen weights fwd+bwd",
        _cell_maker(batch, hidden, dtype, device, True, WITHOUT_COMPILE, frozen=True),
        flops=2 * batch * (2 * hidden) * 3 * hidden * 2, bytes=(2 * 3 * hidden * hidden + batch * hidden * 3)
        * _element(dtype) * 2, dtype=dtype, variants=WITHOUT_COMPILE))
    # h without a gradient at the same shape: the backward skips dL/dh's W_hh product.
    cases.append(harness.Case(
        "gru_cell", f"b={batch} h={hidden} h detached fwd+bwd",
        _cell_maker(batch, hidden, dtype, device, True, WITHOUT_COMPILE, detached=True),
        flops=2 * batch * (2 * hidden) * 3 * hidden * 5 // 2, bytes=(2 * 3 * hidden * hidden + batch * hidden * 3)
        * _element(dtype) * 3, dtype=dtype, variants=WITHOUT_COMPILE))
    return cases


# ---- the modules one step at a time (streaming: the entry points' own cost shows at batch 1) ----------------

def _module_step_maker(batch, hidden, layers, dtype, device):
    """Our nn.GRUCell (layers None) or nn.GRU.step against torch's module on the same weights, forward only."""
    def make():
        if layers is None:
            peer = torch.nn.GRUCell(hidden, hidden, device=device, dtype=dtype)
            ours = GRUCell(hidden, hidden, device=device, dtype=dtype)
            h = torch.randn(batch, hidden, device=device, dtype=dtype)
        else:
            peer = torch.nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, device=device, dtype=dtype)
            ours = GRU(hidden, hidden, num_layers=layers, batch_first=True, device=device, dtype=dtype)
            h = torch.randn(layers, batch, hidden, device=device, dtype=dtype)
        ours.load_state_dict(peer.state_dict())
        x = torch.randn(batch, hidden, device=device, dtype=dtype)
        if layers is None:
            return {"hiertcn_fast": _run(lambda: ours(x, h), [], False),
                    "torch eager": _run(lambda: peer(x, h), [], False)}
        return {"hiertcn_fast": _run(lambda: ours.step(x, h), [], False),
                "torch eager": _run(lambda: (lambda out, h_n: (out[:, 0], h_n))(*peer(x[:, None], h)), [], False)}

    return make


def _module_step_cases(device, quick):
    dtype, hidden = _dtype(device), 128
    cases = []
    for batch in (1, 32):
        for op, layers in (("nn.GRUCell", None), ("nn.GRU.step", 2)):
            name = f"b={batch} h={hidden}" + ("" if layers is None else f" l={layers}") + " fwd"
            cases.append(harness.Case(
                op, name, _module_step_maker(batch, hidden, layers, dtype, device),
                flops=2 * batch * (2 * hidden) * 3 * hidden * (layers or 1),
                bytes=2 * 3 * hidden * hidden * (layers or 1) * _element(dtype), dtype=dtype,
                variants=WITHOUT_COMPILE))
    return cases


# ---- sequence ------------------------------------------------------------------------------------

def _sequence_maker(batch, time, hidden, layers, dtype, device, backward):
    def make():
        module = torch.nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, device=device, dtype=dtype)
        x = torch.randn(batch, time, hidden, device=device, dtype=dtype, requires_grad=backward)
        leaves = [x, *module.parameters()]
        weights = module.all_weights
        return {"hiertcn_fast": _run(lambda: gru(x, None, weights, num_layers=layers), leaves, backward),
                "torch eager": _run(lambda: module(x), leaves, backward)}

    return make


def _sequence_cases(device, quick):
    dtype = _dtype(device)
    hidden, layers = 128, 2
    shapes = [(32, 20), (8, 500)] if quick else [(batch, time) for time in (20, 500) for batch in (1, 8, 32, 64, 256)]
    cases = []
    for batch, time in shapes:
        flops = 2 * batch * time * layers * (2 * hidden) * 3 * hidden
        for backward in (False, True):
            cases.append(harness.Case(
                "gru", f"b={batch} t={time} h={hidden} l={layers} {'fwd+bwd' if backward else 'fwd'}",
                _sequence_maker(batch, time, hidden, layers, dtype, device, backward),
                flops=flops * (3 if backward else 1),
                bytes=batch * time * hidden * (layers + 1) * _element(dtype) * (3 if backward else 1), dtype=dtype,
                variants=WITHOUT_COMPILE))
    return cases


# ---- session_update ------------------------------------------------------------------------------

def session_update_composition(items, lengths, h, keep, layers):
    """HierTCN's session update the PyTorch way: masked mean, nn.GRUCell per layer, masks."""
    in_session = (torch.arange(items.shape[1], device=items.device) < lengths[:, None]).to(items.dtype)
    x = (items * in_session[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(items.dtype)
    states = []
    for layer, weights in enumerate(layers):
        x = torch._VF.gru_cell(x, h[layer], *weights)
        states.append(x)
    return torch.where((lengths > 0)[None, :, None], torch.stack(states), h) * keep[None, :, None]


def _session_maker(batch, time, hidden, layers, dtype, device, backward, variants, detached=False):
    """detached: h wants no gradient (as HierTCN's state comes from its cache)."""
    def make():
        module = torch.nn.GRU(hidden, hidden, num_layers=layers, device=device, dtype=dtype)
        items = torch.randn(batch, time, hidden, device=device, dtype=dtype, requires_grad=backward)
        h = torch.randn(layers, batch, hidden, device=device, dtype=dtype, requires_grad=backward and not detached)
        lengths = torch.randint(0, time + 1, (batch,), device=device)
        keep = (torch.rand(batch, device=device) > 0.1).to(dtype)
        weights = module.all_weights
        leaves = [items] + ([] if detached else [h]) + list(module.parameters())
        made = {"hiertcn_fast": _run(lambda: session_update(items, lengths, h, keep, weights), leaves, backward),
                "torch eager": _run(lambda: session_update_composition(items, lengths, h, keep, weights), leaves,
                                    backward)}
        if "torch.compile" in variants:
            compiled = torch.compile(session_update_composition)
            made["torch.compile"] = _run(lambda: compiled(items, lengths, h, keep, weights), leaves, backward)
        return made

    return make


def _session_cases(device, quick):
    dtype = _dtype(device)
    hidden, layers, time = 128, 2, 20
    batches = (32, 256) if quick else (32, 256, 1024)
    cases = []
    for batch in batches:
        flops = 2 * batch * layers * (2 * hidden) * 3 * hidden
        variants = _variants(quick, batch == 32)
        for backward in (False, True):
            cases.append(harness.Case(
                "session_update", f"b={batch} t={time} h={hidden} l={layers} {'fwd+bwd' if backward else 'fwd'}",
                _session_maker(batch, time, hidden, layers, dtype, device, backward, variants),
                flops=flops * (3 if backward else 1),
                bytes=batch * time * hidden * _element(dtype) * (2 if backward else 1), dtype=dtype,
                variants=variants))
    batch = 256  # the state detached, as HierTCN trains: no W_hh product for dL/dh
    cases.append(harness.Case(
        "session_update", f"b={batch} t={time} h={hidden} l={layers} h detached fwd+bwd",
        _session_maker(batch, time, hidden, layers, dtype, device, True, WITHOUT_COMPILE, detached=True),
        flops=2 * batch * layers * (2 * hidden) * 3 * hidden * 5 // 2, bytes=batch * time * hidden * _element(dtype) * 2,
        dtype=dtype, variants=WITHOUT_COMPILE))
    batch = 1  # serving: one user's session closes
    cases.append(harness.Case(
        "session_update", f"b={batch} t={time} h={hidden} l={layers} fwd",
        _session_maker(batch, time, hidden, layers, dtype, device, False, WITHOUT_COMPILE),
        flops=2 * batch * layers * (2 * hidden) * 3 * hidden, bytes=batch * time * hidden * _element(dtype),
        dtype=dtype, variants=WITHOUT_COMPILE))
    return cases


# ---- session_update_steps --------------------------------------------------------------------------

STEP_BY_STEP = "session_update x steps"


def _steps_maker(steps, batch, time, hidden, layers, dtype, device, backward, detached=False, frozen=False):
    """detached: h wants no gradient; frozen: nor does the GRU (fine-tuning below a pretrained one)."""
    def make():
        module = torch.nn.GRU(hidden, hidden, num_layers=layers, device=device, dtype=dtype).requires_grad_(not frozen)
        # As HierTCN holds them: positions 1..time of the padded batch (steps, batch, time + 1, dim).
        padded = torch.randn(steps, batch, time + 1, hidden, device=device, dtype=dtype, requires_grad=backward)
        h = torch.randn(layers, batch, hidden, device=device, dtype=dtype, requires_grad=backward and not detached)
        lengths = torch.randint(0, time + 1, (steps, batch), device=device)
        keep = torch.rand(steps, batch, device=device) > 0.1
        weights = module.all_weights
        leaves = [padded] + ([] if detached else [h]) + ([] if frozen else list(module.parameters()))

        keep_as_dtype = keep.to(dtype)  # once, outside the timed calls (the fast path converts its bool keep inside)

        def step_by_step(update):
            items, states = padded[:, :, 1:], [h]
            for step in range(steps):
                states.append(update(items[step], lengths[step], states[-1], keep_as_dtype[step], weights))
            return torch.stack(states)

        return {"hiertcn_fast": _run(lambda: session_update_steps(padded[:, :, 1:], lengths, h, keep, weights),
                                     leaves, backward),
                STEP_BY_STEP: _run(lambda: step_by_step(session_update), leaves, backward),
                "torch eager": _run(lambda: step_by_step(session_update_composition), leaves, backward)}

    return make


def _steps_cases(device, quick):
    dtype = _dtype(device)
    steps, hidden, layers, time = 10, 128, 2, 20
    cases = []
    for batch in ((32, 256) if quick else (32, 256, 1024)):
        flops = steps * 2 * batch * layers * (2 * hidden) * 3 * hidden
        for backward in (False, True):
            cases.append(harness.Case(
                "session_update_steps",
                f"s={steps} b={batch} t={time} h={hidden} l={layers} {'fwd+bwd' if backward else 'fwd'}",
                _steps_maker(steps, batch, time, hidden, layers, dtype, device, backward),
                flops=flops * (3 if backward else 1),
                bytes=steps * batch * time * hidden * _element(dtype) * (2 if backward else 1), dtype=dtype,
                variants=("hiertcn_fast", STEP_BY_STEP, "torch eager")))
    batch = 256  # HierTCN's training case: the state from the cache, detached
    cases.append(harness.Case(
        "session_update_steps", f"s={steps} b={batch} t={time} h={hidden} l={layers} h detached fwd+bwd",
        _steps_maker(steps, batch, time, hidden, layers, dtype, device, True, detached=True),
        flops=steps * 2 * batch * layers * (2 * hidden) * 3 * hidden * 3 - layers * 2 * batch * hidden * 3 * hidden,
        bytes=steps * batch * time * hidden * _element(dtype) * 2, dtype=dtype,
        variants=("hiertcn_fast", STEP_BY_STEP, "torch eager")))
    cases.append(harness.Case(  # and with the GRU frozen: the items' gradient alone
        "session_update_steps", f"s={steps} b={batch} t={time} h={hidden} l={layers} h detached, GRU frozen fwd+bwd",
        _steps_maker(steps, batch, time, hidden, layers, dtype, device, True, detached=True, frozen=True),
        flops=steps * 2 * batch * layers * (2 * hidden) * 3 * hidden * 2 - layers * 2 * batch * hidden * 3 * hidden,
        bytes=steps * batch * time * hidden * _element(dtype) * 2, dtype=dtype,
        variants=("hiertcn_fast", STEP_BY_STEP, "torch eager")))
    return cases


def cases(device, quick):
    return (_cell_cases(device, quick) + _module_step_cases(device, quick) + _sequence_cases(device, quick)
            + _session_cases(device, quick) + _steps_cases(device, quick))


test_bench = harness.bench_test(cases)
