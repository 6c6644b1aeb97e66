"""tcn_step: a whole stack of residual causal-conv layers stepped at once (one op on cpu and cuda) against
an independent layer-by-layer composition of the reference step and F.linear; bitwise agreement with the
per-layer cpu step; row resets; the torch.library schema; bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.ops import (CausalConvState, causal_conv1d_reference, causal_conv1d_step,
                              causal_conv1d_step_reference, tcn_step)
from hiertcn_fast.ops.conv import pack_weight
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, TOLERANCE, assert_close, rand


@dataclasses.dataclass
class StackCase:
    batch: int
    channels: tuple  # (C_0, C_1, ..., C_L): the input width, then each layer's output width
    kernels: tuple
    dilations: tuple
    context_channels: int = 0
    bias: bool = True
    activation: str = "relu"
    steps: int = 9
    # Layer 0's residual also projects the context (context_proj_weight), as HierTCN's first block does.
    context_proj: bool = False
    first_proj: bool = False  # layer 0 projects its input even where the width does not change

    def __str__(self):
        return (f"b{self.batch}-c{'x'.join(map(str, self.channels))}-k{''.join(map(str, self.kernels))}-"
                f"d{'.'.join(map(str, self.dilations))}-ctx{self.context_channels}-{self.activation}"
                f"{'' if self.bias else '-nobias'}{'-cproj' if self.context_proj else ''}"
                f"{'-proj0' if self.first_proj else ''}")

    def params(self, dtype, device):
        """Per-layer weights, biases, projections (only where the width changes) and the context inputs."""
        c = self.channels
        layers = range(len(self.kernels))
        # Weights scaled by 1 / sqrt(fan-in), as nn.Conv1d's, so activations keep their size through the stack.
        weights = [rand(c[l + 1], c[l], self.kernels[l], dtype=dtype, device=device,
                        scale=(c[l] * self.kernels[l]) ** -0.5) for l in layers]
        biases = [rand(c[l + 1], dtype=dtype, device=device) if self.bias else None for l in layers]
        projected = [c[l] != c[l + 1] or (l == 0 and self.first_proj) for l in layers]
        proj_weights = [rand(c[l + 1], c[l], dtype=dtype, device=device, scale=c[l] ** -0.5) if projected[l] else None
                        for l in layers]
        proj_biases = [rand(c[l + 1], dtype=dtype, device=device) if projected[l] and self.bias else None
                       for l in layers]
        context = context_weight = context_proj_weight = None
        if self.context_channels:
            context = rand(self.batch, self.context_channels, dtype=dtype, device=device)
            context_weight = rand(c[1], self.context_channels, self.kernels[0], dtype=dtype, device=device,
                                  scale=(self.context_channels * self.kernels[0]) ** -0.5)
            if self.context_proj:
                context_proj_weight = rand(c[1], self.context_channels, dtype=dtype, device=device,
                                           scale=self.context_channels ** -0.5)
        return dict(weights=weights, biases=biases, proj_weights=proj_weights, proj_biases=proj_biases,
                    context=context, context_weight=context_weight, context_proj_weight=context_proj_weight)

    def states(self, dtype, device):
        return [CausalConvState.zeros(self.batch, self.channels[l], k, d, dtype=dtype, device=device)
                for l, (k, d) in enumerate(zip(self.kernels, self.dilations))]


CASES = [
    # Projections where the width changes (layers 0 and 2), mixed k and dilation, context, a row reset.
    StackCase(3, (6, 8, 8, 5), (3, 2, 4), (1, 3, 2), context_channels=4),
    # Batch 1; a k = 1 layer (no history at all); no biases; tanh.
    StackCase(1, (5, 5, 5), (1, 5), (1, 7), bias=False, activation="tanh"),
    # One full tile of 8 rows plus one; widths past a vector block with a tail; gelu.
    StackCase(9, (40, 40, 40), (3, 3), (1, 2), context_channels=3, activation="gelu"),
    # HierTCN-like widths at a small batch (the single-row and padded-block paths of the dense kernel).
    StackCase(2, (128, 128, 128, 128), (5, 5, 5), (1, 2, 2), context_channels=6, steps=12),
    # The context projected on layer 0's residual: with a width change, and on top of the identity residual.
    StackCase(3, (6, 8, 8, 5), (3, 2, 4), (1, 3, 2), context_channels=4, context_proj=True),
    StackCase(9, (40, 40, 40), (3, 3), (1, 2), context_channels=3, activation="gelu", context_proj=True),
    # HierTCN's stack: 128 channels, k = 5, dilations 1 and 2, a 256-wide user state on the first block's conv
    # and residual projection.
    StackCase(2, (128, 128, 128), (5, 5), (1, 2), context_channels=256, context_proj=True, first_proj=True,
              steps=12),
]


def layer_by_layer(x, params, states):
    """The definition: each layer's reference step with its residual (the input, or its nn.Linear projection)."""
    h = x
    for l, state in enumerate(states):
        proj = params["proj_weights"][l]
        residual = h if proj is None else F.linear(h, proj, params["proj_biases"][l])
        if l == 0 and params.get("context_proj_weight") is not None:
            residual = residual + F.linear(params["context"], params["context_proj_weight"])
        extra = dict(context=params["context"], context_weight=params["context_weight"]) if l == 0 else {}
        h = causal_conv1d_step_reference(h, params["weights"][l], state, params["biases"][l], residual=residual,
                                         activation=params["activation"], **extra)
    return h


def _run_both(case, backend, device, reset_at=None, params=None):
    dtype = COMPARE_DTYPE[backend]
    params = case.params(torch.float64, device) if params is None else params
    xs = rand(case.batch, case.steps, case.channels[0], device=device)
    states, expected_states = case.states(dtype, device), case.states(torch.float64, device)
    cast = {k: ([None if t is None else t.to(dtype) for t in v] if isinstance(v, list) else
                (None if v is None else v.to(dtype))) for k, v in params.items()}
    outs, expected = [], []
    for t in range(case.steps):
        if t == reset_at:
            rows = torch.tensor([case.batch - 1], device=device)
            for state in states + expected_states:
                state.reset(rows)
        with torch.no_grad():
            outs.append(tcn_step(xs[:, t].to(dtype), cast["weights"], cast["biases"], states,
                                 proj_weights=cast["proj_weights"], proj_biases=cast["proj_biases"],
                                 context=cast["context"], context_weight=cast["context_weight"],
                                 context_proj_weight=cast["context_proj_weight"], activation=case.activation,
                                 backend=backend))
        expected.append(layer_by_layer(xs[:, t], dict(params, activation=case.activation), expected_states))
    return torch.stack(outs, 1), torch.stack(expected, 1), states, expected_states, xs


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tcn_step_equals_layer_by_layer_reference(backend, device, case):
    outs, expected, states, expected_states, xs = _run_both(case, backend, device, reset_at=case.steps // 2)
    assert_close(outs, expected, COMPARE_DTYPE[backend])
    for state, expected_state in zip(states, expected_states):
        assert torch.equal(state.position, expected_state.position)
    # The first layer's history holds the inputs themselves, bitwise.
    assert torch.equal(states[0].history, expected_states[0].history.to(states[0].history.dtype))
    assert states[0].position.tolist() == [case.steps] * (case.batch - 1) + [case.steps - case.steps // 2]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tcn_step_equals_the_forward_over_the_sequence(backend, device, case):
    """An independent definition: each layer's full-sequence convolution (causal_conv1d_reference, no step code)
    over the whole sequence of the layer below, with its residual; the steps give its outputs at every time."""
    params = case.params(torch.float64, device)
    outs, _, states, _, xs = _run_both(case, backend, device, params=params)
    h = xs
    for l, state in enumerate(states):
        proj = params["proj_weights"][l]
        residual = h if proj is None else F.linear(h, proj, params["proj_biases"][l])
        if l == 0 and params["context_proj_weight"] is not None:
            residual = residual + F.linear(params["context"], params["context_proj_weight"])[:, None]
        extra = dict(context=params["context"], context_weight=params["context_weight"]) if l == 0 else {}
        h = causal_conv1d_reference(h, params["weights"][l], params["biases"][l], dilation=state.dilation,
                                    activation=case.activation, residual=residual, **extra)
    assert_close(outs, h, COMPARE_DTYPE[backend])


@pytest.mark.cpu_kernels_only  # the CUDA stack kernel splits each channel's sum over threads
@pytest.mark.parametrize("batch", [1, 2, 3, 9, 20])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_stack_equals_the_per_layer_cpu_step_bitwise(batch, threads):
    """Without projections the fused stack runs the per-layer op's kernels in the same order: the outputs and
    every layer's state are bitwise those of stepping layer by layer, at any thread count. With two threads,
    batches of one tile (up to 8 rows) run in a team that splits each layer's output channels (this stack's
    1.3 MB of weights is past the team's threshold), larger ones split tiles of rows; the first step is the
    op's, later ones a prepared plan's."""
    case = StackCase(batch, (128,) * 6, (5, 3, 5, 2, 5), (1, 4, 2, 3, 8), context_channels=5, steps=10)
    params = case.params(torch.float32, "cpu")
    xs = rand(batch, case.steps, 128, dtype=torch.float32)
    fused, per_layer = case.states(torch.float32, "cpu"), case.states(torch.float32, "cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(case.steps):
            with torch.no_grad():
                out = tcn_step(xs[:, t], params["weights"], params["biases"], fused, context=params["context"],
                               context_weight=params["context_weight"], backend="cpu")
                h = xs[:, t]
                for l, state in enumerate(per_layer):
                    extra = dict(context=params["context"], context_weight=params["context_weight"]) if l == 0 else {}
                    h = causal_conv1d_step(h, params["weights"][l], state, params["biases"][l], residual=h,
                                           activation="relu", backend="cpu", **extra)
            assert torch.equal(out, h), f"step {t}"
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(fused, per_layer):
        assert torch.equal(a.history, b.history) and torch.equal(a.position, b.position)


def test_stacks_deeper_than_the_fused_op_step_layer_by_layer():
    case = StackCase(2, (3,) * 35, (2,) * 34, (1,) * 34, steps=3)
    params = case.params(torch.float64, "cpu")
    states, expected_states = case.states(torch.float64, "cpu"), case.states(torch.float64, "cpu")
    for t in range(case.steps):
        x = rand(2, 3)
        out = tcn_step(x, params["weights"], params["biases"], states, backend="cpu")
        assert_close(out, layer_by_layer(x, dict(params, activation="relu"), expected_states))


@pytest.mark.parametrize("changed", ["weights", "proj_weights", "context", "context_weight", "context_proj_weight"])
def test_a_change_in_place_is_seen_by_the_next_step(changed):
    """The packed weights, projections, context table and the context's residual term are cached between steps;
    an in-place change (an optimiser step, a new session's user state) must reach the next step."""
    case = CASES[4]
    params = case.params(torch.float64, "cpu")
    states, expected_states = case.states(torch.float64, "cpu"), case.states(torch.float64, "cpu")
    call = dict(proj_weights=params["proj_weights"], proj_biases=params["proj_biases"], context=params["context"],
                context_weight=params["context_weight"], context_proj_weight=params["context_proj_weight"],
                backend="cpu")
    for t in range(3):
        x = rand(case.batch, case.channels[0])
        if t == 2:
            target = params[changed]
            (target[0] if isinstance(target, list) else target).mul_(-2)
        assert_close(tcn_step(x, params["weights"], params["biases"], states, **call),
                     layer_by_layer(x, dict(params, activation="relu"), expected_states))


def test_prepared_step_runs_only_for_the_arguments_it_was_prepared_for(monkeypatch):
    """From the second call with the same argument objects the CPU step runs a prepared plan (no dispatcher);
    a replaced weight or state tensor, new storage under a weight, or another backend requested must never
    run a stale plan, and a bad x is still a clear error."""
    import hiertcn_fast.ops.conv as conv
    runs = []
    real_run = conv.prepared_tcn_step
    monkeypatch.setattr(conv, "prepared_tcn_step", lambda *a: runs.append(1) or real_run(*a))
    case = CASES[4]
    params = case.params(torch.float64, "cpu")
    states, expected_states = case.states(torch.float64, "cpu"), case.states(torch.float64, "cpu")
    call = dict(proj_weights=params["proj_weights"], proj_biases=params["proj_biases"], context=params["context"],
                context_weight=params["context_weight"], context_proj_weight=params["context_proj_weight"])

    def step(expect_plan):
        before = len(runs)
        x = rand(case.batch, case.channels[0])
        assert_close(tcn_step(x, params["weights"], params["biases"], states, **call),
                     layer_by_layer(x, dict(params, activation="relu"), expected_states))
        assert (len(runs) > before) == expect_plan
        return x

    step(False)  # the op
    step(True)  # prepared now, and run
    assert states[0]._prepared[2] is not None
    step(True)
    # A weight replaced by another tensor: the op runs (and a new plan is prepared on the next call).
    params["weights"] = [params["weights"][0].clone().mul_(-1), *params["weights"][1:]]
    step(False)
    step(True)
    # The context's residual projection replaced by another tensor: the op runs, then a new plan.
    params["context_proj_weight"] = call["context_proj_weight"] = params["context_proj_weight"].clone().mul_(-1)
    step(False)
    step(True)
    # New storage under the same weight tensor (its version may not move).
    params["weights"][1].data = params["weights"][1].data.clone().mul_(0.5)
    plan = states[0]._prepared[2]
    step(True)  # the plan refuses; the weights are repacked and a new plan runs, in the same call
    assert states[0]._prepared[2] is not plan
    step(True)
    # A state tensor rebound: its new tensor is the one stepped.
    old_history = states[2].history
    states[2].history = old_history.clone()
    step(False)
    assert not torch.equal(states[2].history, old_history)
    step(True)
    # Another backend requested: never the CPU plan.
    monkeypatch.setenv("HIERTCN_BACKEND", "reference")
    step(False)
    monkeypatch.delenv("HIERTCN_BACKEND")
    step(True)  # the plan reads the states the reference steps advanced
    # An x the plan does not take goes the checked way, whose error names it (the plan said "x must be (3, 6)"),
    # and the plan stays for the next good call.
    with pytest.raises(ValueError, match=r"x \(batch, in_channels\).* must have shape \(3, 6\), got \(2, 6\)"):
        tcn_step(rand(2, case.channels[0]), params["weights"], params["biases"], states, **call)
    step(True)


def _op_call(case, dtype=torch.float64, device="cpu"):
    params = case.params(dtype, device)
    states = case.states(dtype, device)
    from hiertcn_fast.ops.conv import context_table
    table = context_table(params["context"], params["context_weight"]).contiguous()
    term = (None if params["context_proj_weight"] is None
            else F.linear(params["context"], params["context_proj_weight"]).contiguous())
    args = (rand(case.batch, case.channels[0], dtype=dtype, device=device),
            [pack_weight(w, 1) for w in params["weights"]], params["biases"],
            [None if p is None else p.t().contiguous() for p in params["proj_weights"]], params["proj_biases"],
            table, term, list(case.dilations), 1)
    kwargs = dict(histories=[s.history for s in states], positions=[s.position for s in states],
                  out=torch.empty(case.batch, case.channels[-1], dtype=dtype, device=device))
    return args, kwargs


def _blocked_args(args, blocks):
    """_op_call's arguments with layer l's weights and projection column-blocked in blocks[l] channels."""
    from hiertcn_fast.ops.conv import _blocked
    packed = [_blocked(w, b) for w, b in zip(args[1], blocks)]
    projections = [None if p is None else _blocked(p, b) for p, b in zip(args[3], blocks)]
    return (args[0], packed, args[2], projections, *args[4:])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_column_blocked_packing_equals_the_plain_one_bitwise(threads, batch):
    """The CPU op takes each layer's weights (and projection) as column blocks; block widths that are multiples
    of the 16-float vector (the ones tcn_step picks) give bitwise the plain packing's outputs and states: each
    output channel sums the same terms in the same order. (A block with a scalar tail may round differently.)"""
    case = StackCase(batch, (32, 64, 64, 48), (3, 2, 4), (1, 3, 2), context_channels=4, context_proj=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for blocks in ([64, 64, 48], [16, 32, 16], [32, 16, 16], [64, 64, 16]):  # 64 and 48: the plain packing
            torch.manual_seed(0)
            args, kwargs = _op_call(case, torch.float32)
            if blocks != [64, 64, 48]:
                args = _blocked_args(args, blocks)
                assert any(w.dim() == 4 for w in args[1])
            for _ in range(5):  # a few steps, so the histories are read too
                torch.ops.hiertcn_fast.tcn_step_out(*args, **kwargs)
            results.append((kwargs["out"].clone(), [h.clone() for h in kwargs["histories"]]))
    finally:
        torch.set_num_threads(previous)
    plain_out, plain_histories = results[0]
    assert plain_out.abs().sum() > 0
    for out, histories in results[1:]:
        assert torch.equal(out, plain_out)
        assert all(torch.equal(h, g) for h, g in zip(histories, plain_histories, strict=True))


def test_column_blocked_projection_must_match_its_weights_blocks():
    plain, kwargs = _op_call(CASES[0], torch.float32)
    args = _blocked_args(plain, [4, 8, 5])
    assert args[1][0].dim() == 4 and args[3][0].dim() == 3
    bad_projections = [plain[3][0], *args[3][1:]]  # layer 0's weights blocked, its projection left plain
    with pytest.raises(RuntimeError, match="column-blocked like the packed weights"):
        torch.ops.hiertcn_fast.tcn_step_out(args[0], args[1], args[2], bad_projections, *args[4:], **kwargs)
    torch.ops.hiertcn_fast.tcn_step_out(*args, **kwargs)  # the matching blocks run


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=str)
def test_opcheck_tcn_step_op(case):
    args, kwargs = _op_call(case)
    torch.library.opcheck(torch.ops.hiertcn_fast.tcn_step_out.default, args, kwargs)


def test_bad_input_is_a_clear_error():
    case = CASES[0]
    params = case.params(torch.float32, "cpu")
    states = case.states(torch.float32, "cpu")
    x = rand(case.batch, case.channels[0], dtype=torch.float32)
    w, b = params["weights"], params["biases"]
    with pytest.raises(ValueError, match="one entry per layer"):
        tcn_step(x, w, b[:2], states)
    with pytest.raises(ValueError, match="x must be 2-D"):
        tcn_step(x[:, None], w, b, states)
    with pytest.raises(ValueError, match=r"weights\[1\] has k=2 taps but states\[1\] was made for k=3"):
        tcn_step(x, w, b, [states[0], CausalConvState.zeros(3, 8, 3, 3), states[2]],
                 proj_weights=params["proj_weights"], backend="cpu")
    with pytest.raises(RuntimeError, match="needs proj_weights"):
        tcn_step(x, w, b, states, backend="cpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        tcn_step(x, w, b, states, activation="swish")
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype torch.float64 but x has torch.float32"):
        tcn_step(x, [w[0].double(), *w[1:]], b, states, proj_weights=params["proj_weights"], backend="cpu")
    # A weight, bias or projection on another device was stepped by another kernel, or by none: on meta the fake
    # kernel wrote nothing and the output came back uninitialised, the states unstepped. Refused, on every path.
    positions = [state.position.clone() for state in states]
    for backend in ("cpu", "reference", None):
        for changed in ("weights", "biases", "proj_weights", "proj_biases"):
            given = {"weights": list(w), "biases": list(b), "proj_weights": list(params["proj_weights"]),
                     "proj_biases": list(params["proj_biases"])}
            layer = next(l for l, t in enumerate(given[changed]) if t is not None)
            given[changed][layer] = given[changed][layer].to("meta")
            with pytest.raises(ValueError, match=rf"{changed}\[{layer}\] is on meta but x is on cpu"):
                tcn_step(x, given["weights"], given["biases"], states, proj_weights=given["proj_weights"],
                         proj_biases=given["proj_biases"], backend=backend)
            assert all(torch.equal(s.position, p) for s, p in zip(states, positions, strict=True)), (backend, changed)
    with pytest.raises(ValueError, match="context and context_weight must be given together"):
        tcn_step(x, w, b, states, context=params["context"])
    with pytest.raises(ValueError, match="context_proj_weight .* is given without context"):
        tcn_step(x, w, b, states, proj_weights=params["proj_weights"], context_proj_weight=rand(8, 4, dtype=torch.float32))
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"context_proj_weight \(out_channels, ctx_channels\) must have shape "
                                             r"\(8, 4\)"):
            tcn_step(x, w, b, states, proj_weights=params["proj_weights"], context=params["context"],
                     context_weight=params["context_weight"], context_proj_weight=rand(8, 5, dtype=torch.float32), backend=backend)
    # Nothing was stepped by the failed calls.
    assert all(int(s.position.sum()) == 0 for s in states)


def test_compiled_op_checks_arguments_itself():
    args, kwargs = _op_call(CASES[0], torch.float32)
    ops = torch.ops.hiertcn_fast
    with pytest.raises(RuntimeError, match="one entry per layer"):
        ops.tcn_step_out(*args[:7], args[7][:2], *args[8:], **kwargs)
    bad = dict(kwargs, histories=[kwargs["histories"][0][:, :1], *kwargs["histories"][1:]])
    with pytest.raises(RuntimeError, match="histories"):
        ops.tcn_step_out(*args, **bad)
    with pytest.raises(RuntimeError, match="out must have shape"):
        ops.tcn_step_out(*args, **dict(kwargs, out=torch.empty(3, 4)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], StackCase(2, (300, 300, 20), (3, 2), (1, 5), steps=7),
                                  StackCase(5, (20, 20), (4,), (2,), context_channels=3, steps=8)], ids=str)
def test_cuda_stack_step_in_one_launch(case, dtype):
    params = case.params(torch.float64, "cuda")
    xs = rand(case.batch, case.steps, case.channels[0], device="cuda")
    states, expected_states = case.states(dtype, "cuda"), case.states(torch.float64, "cuda")
    cast = {k: ([None if t is None else t.to(dtype) for t in v] if isinstance(v, list) else
                (None if v is None else v.to(dtype))) for k, v in params.items()}
    for t in range(case.steps):
        out = tcn_step(xs[:, t].to(dtype), cast["weights"], cast["biases"], states, proj_weights=cast["proj_weights"],
                       proj_biases=cast["proj_biases"], context=cast["context"],
                       context_weight=cast["context_weight"], context_proj_weight=cast["context_proj_weight"],
                       activation=case.activation, backend="cuda")
        expected = layer_by_layer(xs[:, t], dict(params, activation=case.activation), expected_states)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    for state, expected_state in zip(states, expected_states):
        assert torch.equal(state.position, expected_state.position)


def test_cached_packing_does_not_keep_the_weights_alive():
    import gc
    import weakref

    from hiertcn_fast.ops import conv as conv_ops

    case = CASES[0]
    params = case.params(torch.float32, "cpu")
    states = case.states(torch.float32, "cpu")
    tcn_step(rand(case.batch, case.channels[0], dtype=torch.float32), params["weights"], params["biases"], states,
             proj_weights=params["proj_weights"], proj_biases=params["proj_biases"], context=params["context"],
             context_weight=params["context_weight"], backend="cpu")
    first = weakref.ref(params["weights"][0])
    assert params["weights"][0] in conv_ops._packed_stacks
    del params, states
    gc.collect()
    assert first() is None


def test_a_stepped_state_is_freed_without_the_cycle_collector():
    """The caches tcn_step keeps on a state (checks, prepared plan) must not refer back to it: the streaming
    recommender makes a fresh state per call, and a reference cycle would keep each one's buffers alive
    until the garbage collector runs."""
    import gc
    import weakref
    from hiertcn_fast.nn import TCN
    tcn = TCN(16, [16, 16, 16], 3).eval()
    x = rand(2, 16, dtype=torch.float32)
    gc.disable()
    try:
        state = tcn.init_state(2)
        with torch.no_grad():
            for _ in range(3):  # the op, then a prepared plan
                tcn.step(x, state)
        assert state.layers[0]._prepared[2] is not None
        first, history = weakref.ref(state.layers[0]), weakref.ref(state.layers[1].history)
        del state
        assert first() is None and history() is None
    finally:
        gc.enable()


def test_inference_context_table_repacks_a_changed_context_weight():
    """Without autograd, context_table multiplies by a packing of the context weight cached per weight tensor: it
    must equal the autograd path's result, and follow in-place changes and new storage of the weight."""
    from hiertcn_fast.ops.conv import context_table
    context, weight = rand(3, 7), rand(5, 7, 4).requires_grad_()

    def expected():
        return torch.einsum("bc,ocj->bjo", context, weight.detach()).flip(1).cumsum(1)

    assert_close(context_table(context, weight), expected())  # autograd path (weight requires grad)
    assert context_table(context, weight).requires_grad
    with torch.no_grad():
        assert_close(context_table(context, weight), expected())
        weight.mul_(-3)
        assert_close(context_table(context, weight), expected())
    weight.data = weight.data * 0.5 + 1
    with torch.no_grad():
        assert_close(context_table(context, weight), expected())


@pytest.mark.parametrize("prepared", [False, True])
def test_a_negative_position_is_a_clear_error_not_a_stray_write(prepared):
    """A position indexes the circular history: a negative one (a corrupted or hand-written state) must be
    refused before anything is read or written, on the op and on the prepared step alike."""
    from hiertcn_fast.nn import TCN
    tcn = TCN(4, [4, 4], 3).double().eval()
    state = tcn.init_state(2)
    x = rand(2, 4)
    with torch.no_grad():
        for _ in range(3 if prepared else 1):
            tcn.step(x, state)
        assert (state.layers[0]._prepared[2] is not None) == prepared
        state.layers[1].position[1] = -7
        histories = [layer.history.clone() for layer in state.layers]
        with pytest.raises(ValueError, match=r"position must be >= 0.*layer 1, row 1 has -7"):
            tcn.step(x, state)
        for layer, before in zip(state.layers, histories):
            assert torch.equal(layer.history, before)
    single = CausalConvState.zeros(2, 4, 3, 2, dtype=torch.float64)
    single.position[0] = -1
    with pytest.raises(ValueError, match=r"position must be >= 0.*row 0 has -1"):
        causal_conv1d_step(x, rand(4, 4, 3), single, backend="cpu")


def test_a_negative_position_in_a_stack_stepped_layer_by_layer_steps_no_layer():
    """A stack deeper than the fused op takes (33 layers) steps layer by layer on the cpu backend: a negative
    position in layer 1 was refused by layer 1's step, after layer 0 had stepped (its position and history moved)."""
    from hiertcn_fast.nn import TCN
    tcn = TCN(3, [3] * 33, 2, [1] * 33).double().eval()
    state = tcn.init_state(2)
    x = rand(2, 3)
    with torch.no_grad():
        tcn.step(x, state)
        state.layers[1].position[1] = -2
        before = [(layer.history.clone(), layer.position.clone()) for layer in state.layers]
        with pytest.raises(ValueError, match=r"position must be >= 0.*layer 1, row 1 has -2"):
            tcn.step(x, state)
    for layer, (history, position) in zip(state.layers, before):
        assert torch.equal(layer.history, history) and torch.equal(layer.position, position)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] in ("triton", "cuda")])
def test_a_negative_position_on_a_device_kernel_is_a_nan_row(backend, device):
    """The device kernels cannot raise without a sync per step: a row with a negative position gets a NaN
    output and keeps its state (history and position), and the other rows step as usual."""
    dtype = COMPARE_DTYPE[backend]
    weight = rand(6, 4, 3, dtype=dtype, device=device)
    x = rand(2, 4, dtype=dtype, device=device)
    state, healthy = (CausalConvState.zeros(2, 4, 3, 2, dtype=dtype, device=device) for _ in range(2))
    state.position[1] = -5
    history = state.history.clone()
    out = causal_conv1d_step(x, weight, state, backend=backend)
    assert torch.isnan(out[1]).all()
    assert state.position.tolist() == [1, -5] and torch.equal(state.history[1], history[1])
    assert_close(out[0], causal_conv1d_step(x, weight, healthy, backend="reference")[0], dtype)
    if backend == "cuda":  # the stack kernel: no layer of the row is touched
        layers = [CausalConvState.zeros(2, 4, 3, d, dtype=dtype, device=device) for d in (1, 2)]
        layers[1].position[1] = -1
        before = [(layer.history.clone(), layer.position.clone()) for layer in layers]
        out = tcn_step(x, [rand(4, 4, 3, dtype=dtype, device=device)] * 2, [None, None], layers, backend="cuda")
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
        for layer, (history, position) in zip(layers, before):
            assert torch.equal(layer.history[1], history[1]) and layer.position[1] == position[1]


def test_weights_changed_through_data_are_seen_after_forget_weight_caches():
    """The step caches (packed weights, prepared steps, context tables) notice in-place changes by the version
    counter, which ``.data`` bypasses: after ops.forget_weight_caches() such a change is seen, by TCN.step's
    prepared path, by ops.tcn_step and by causal_conv1d_step, exactly as an in-place change under no_grad."""
    import copy

    from hiertcn_fast.nn import TCN
    from hiertcn_fast.ops import causal_conv1d_step, forget_weight_caches, tcn_step

    torch.manual_seed(7)
    changed = TCN(4, [8, 8], 3, context_channels=3).eval()
    expected = copy.deepcopy(changed)
    x, context = torch.randn(2, 4), torch.randn(2, 3)
    states = [changed.init_state(2), expected.init_state(2)]
    with torch.no_grad():
        for _ in range(3):  # the third step runs the prepared plan
            for tcn, state in zip((changed, expected), states):
                tcn.step(x, state, context)
        changed.blocks[1].conv.weight.data.mul_(2)
        changed.blocks[0].conv.context_weight.data.mul_(-1)
        expected.blocks[1].conv.weight.mul_(2)
        expected.blocks[0].conv.context_weight.mul_(-1)
        forget_weight_caches()
        for _ in range(2):
            got, want = (tcn.step(x, state, context) for tcn, state in zip((changed, expected), states))
            assert torch.equal(got, want)

        weights = [block.conv.weight for block in changed.blocks]
        biases = [block.conv.bias for block in changed.blocks]
        projection = dict(proj_weights=[None if b.projection is None else b.projection.weight for b in changed.blocks],
                          proj_biases=[None if b.projection is None else b.projection.bias for b in changed.blocks])
        ops_states = [changed.init_state(2), changed.init_state(2)]
        context_weight = changed.blocks[0].conv.context_weight
        for _ in range(3):  # the same history in both states; the first through the prepared step
            tcn_step(x, weights, biases, ops_states[0].layers, context=context, context_weight=context_weight,
                     **projection)
            tcn_step(x, [w.clone() for w in weights], biases, ops_states[1].layers, context=context,
                     context_weight=context_weight.clone(), **projection)
        weights[0].data.add_(1.0)
        forget_weight_caches()
        got = tcn_step(x, weights, biases, ops_states[0].layers, context=context, context_weight=context_weight,
                       **projection)
        want = tcn_step(x, [w.clone() for w in weights], biases, ops_states[1].layers, context=context,
                        context_weight=context_weight.clone(), **projection)
        assert torch.equal(got, want)

        conv = changed.blocks[0].conv
        layer_states = [conv.init_state(2), conv.init_state(2)]
        weight, context_weight = conv.weight, conv.context_weight
        causal_conv1d_step(x, weight, layer_states[0], context=context, context_weight=context_weight)
        causal_conv1d_step(x, weight.clone(), layer_states[1], context=context, context_weight=context_weight.clone())
        weight.data.mul_(3)
        context_weight.data.mul_(3)
        forget_weight_caches()
        got = causal_conv1d_step(x, weight, layer_states[0], context=context, context_weight=context_weight)
        want = causal_conv1d_step(x, weight.clone(), layer_states[1], context=context,
                                  context_weight=context_weight.clone())
        assert torch.equal(got, want)


def _rebind_at_the_same_address(weight, values):
    """weight.data = new storage holding ``values`` at the address of weight's current storage, with the version
    counter unmoved: what a module's .half() then .float() does when the allocator hands the freed block back.
    (Two tensors made by torch.from_numpy from one array: two storages over the same memory.)"""
    array = weight.detach().numpy()
    array[...] = values.numpy()  # (through NumPy: no version counter moves)
    address, version, storage = weight.data_ptr(), weight._version, weight.untyped_storage()
    weight.data = torch.from_numpy(array)
    assert weight.data_ptr() == address and weight._version == version and weight.untyped_storage() is not storage


def test_new_storage_at_the_old_address_is_seen_by_every_weight_cache():
    """A weight given new storage (w.data = ..., which a module's .half(), .double() or .to() round trip does)
    whose memory lands at the old address, with the version counter unmoved: the packed weights, prepared steps
    and context packings compare the storage itself, so the next step uses the new values, exactly as a fresh
    copy of the module does -- on TCN.step's prepared path, causal_conv1d_step and context_table."""
    import copy

    import numpy as np

    from hiertcn_fast.nn import TCN
    from hiertcn_fast.ops.conv import context_table

    torch.manual_seed(11)
    changed = TCN(4, [8, 8], 3, context_channels=3).eval()
    for block in changed.blocks:  # storages of their own, which NumPy can write
        for name, p in block.conv.named_parameters():
            p.data = torch.from_numpy(np.array(p.detach().numpy()))
    x, context = torch.randn(2, 4), torch.randn(2, 3)
    state = changed.init_state(2)
    conv = changed.blocks[0].conv
    layer_state = conv.init_state(2)
    with torch.no_grad():
        for _ in range(3):  # the third step runs the prepared plan; each cache is filled
            changed.step(x, state, context)
            causal_conv1d_step(x, conv.weight, layer_state, context=context, context_weight=conv.context_weight)
        context_table(context, conv.context_weight)
        assert state.layers[0]._prepared[2] is not None
        expected = copy.deepcopy(changed)
        expected_state, expected_layer_state = copy.deepcopy(state), copy.deepcopy(layer_state)
        for module in (changed, expected):
            weight, context_weight = module.blocks[1].conv.weight, module.blocks[0].conv.context_weight
            if module is changed:
                _rebind_at_the_same_address(weight, weight * -2 + 0.25)
                _rebind_at_the_same_address(context_weight, context_weight * 3)
            else:
                weight.mul_(-2).add_(0.25)
                context_weight.mul_(3)
        _rebind_at_the_same_address(conv.weight, conv.weight * 0.5 - 1)
        expected.blocks[0].conv.weight.mul_(0.5).sub_(1)
        ref_conv = expected.blocks[0].conv
        for _ in range(2):
            assert torch.equal(changed.step(x, state, context), expected.step(x, expected_state, context))
            assert torch.equal(
                causal_conv1d_step(x, conv.weight, layer_state, context=context, context_weight=conv.context_weight),
                causal_conv1d_step(x, ref_conv.weight, expected_layer_state, context=context,
                                   context_weight=ref_conv.context_weight))
        assert torch.equal(context_table(context, conv.context_weight), context_table(context, ref_conv.context_weight))


def test_weights_set_from_a_vector_are_seen_and_its_in_place_changes_after_forget_weight_caches():
    """nn.utils.vector_to_parameters makes each weight a view of the vector, through ``.data``: a new vector's
    values are new storage, seen by the step caches unaided; an in-place change of the same vector changes the
    weights without moving their version counters (the vector has its own), which no cache can see: after
    ops.forget_weight_caches() the step uses the new values, as a state without caches does."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from hiertcn_fast.nn import CausalConv1d
    from hiertcn_fast.ops import forget_weight_caches

    torch.manual_seed(0)
    conv = CausalConv1d(8, 8, 3, bias=False)
    state, x = conv.init_state(1), torch.randn(1, 8)
    with torch.no_grad():
        conv.step(x, state)  # packs the weight into the state's cache
        vector_to_parameters(parameters_to_vector(conv.parameters()) * -2, conv.parameters())
        uncached = state.to()  # the same history and positions, without caches
        assert torch.equal(conv.step(x, state), conv.step(x, uncached))
        flat = parameters_to_vector(conv.parameters())
        vector_to_parameters(flat, conv.parameters())
        conv.step(x, state)
        flat.mul_(3)
        forget_weight_caches()
        uncached = state.to()  # the same history and positions, without caches
        assert torch.equal(conv.step(x, state), conv.step(x, uncached))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_steps_compile_fullgraph_and_follow_weight_changes(backend):
    """torch.compile(fullgraph=True) of causal_conv1d_step, tcn_step and TCN.step, with a context: the outputs
    and states of eager (to rounding), step after step, and a weight changed in place between steps is used (the
    compiled graph packs it at every call instead of baking a packing in)."""
    from hiertcn_fast.nn import TCN

    torch.manual_seed(0)
    tcn = TCN(4, [6, 5], 3, (1, 2), context_channels=3, backend=backend)
    conv = tcn.blocks[0].conv
    context = rand(2, 3, dtype=torch.float32)
    weights = [block.conv.weight for block in tcn.blocks]
    biases = [block.conv.bias for block in tcn.blocks]
    proj_weights = [None if block.projection is None else block.projection.weight for block in tcn.blocks]
    proj_biases = [None if block.projection is None else block.projection.bias for block in tcn.blocks]

    def one_layer(x, state):
        return causal_conv1d_step(x, conv.weight, state, conv.bias, context=context,
                                  context_weight=conv.context_weight, activation="relu", backend=backend)

    def stack(x, states):
        return tcn_step(x, weights, biases, states, proj_weights=proj_weights, proj_biases=proj_biases,
                        context=context, context_weight=conv.context_weight, activation="relu", backend=backend)

    def module(x, state):
        return tcn.step(x, state, context)

    runs = [(one_layer, lambda: CausalConvState.zeros(2, 4, 3, 1)), (stack, lambda: tcn.init_state(2).layers),
            (module, lambda: tcn.init_state(2))]
    with torch.no_grad():
        for fn, make_state in runs:
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            eager_state, compiled_state = make_state(), make_state()
            for t in range(5):
                if t == 3:
                    conv.weight.mul_(-1.5)
                x = rand(2, 4, dtype=torch.float32)
                torch.testing.assert_close(compiled(x, compiled_state), fn(x, eager_state), msg=fn.__name__)
            pairs = ([(eager_state, compiled_state)] if fn is one_layer else
                     zip(eager_state.layers if fn is module else eager_state,
                         compiled_state.layers if fn is module else compiled_state))
            for a, b in pairs:  # a deeper layer's history holds outputs, which the compiled graph rounds its way
                torch.testing.assert_close(b.history, a.history)
                assert torch.equal(a.position, b.position)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] == "triton"])
def test_a_layer_the_triton_stack_refuses_leaves_the_layers_below_it_unstepped(backend, device):
    """Layer by layer, every layer is checked before the first steps: a strided history or position of layer 1,
    which the Triton kernels would misread, was refused only after layer 0 had stepped."""
    torch.manual_seed(0)
    weights = [rand(4, 4, 3, device=device, dtype=torch.float32) for _ in range(2)]
    for strided in ("history", "position"):
        first = CausalConvState.zeros(2, 4, 3, 1, device=device)
        wide_history = torch.zeros(2, 4, 8, device=device)
        wide_position = torch.zeros(4, dtype=torch.int64, device=device)
        second = CausalConvState(wide_history[:, :, :4] if strided == "history" else wide_history[:, :, :4].clone(),
                                 wide_position[::2] if strided == "position" else wide_position[:2].clone(), 3, 2)
        with pytest.raises(ValueError, match=f"{strided}.*contiguous"):
            tcn_step(rand(2, 4, device=device, dtype=torch.float32), weights, [None, None], [first, second],
                     backend=backend)
        assert first.position.tolist() == [0, 0] and not first.history.any(), strided


def test_steps_run_on_fake_tensors():
    """Under FakeTensorMode (opcheck, export, shape propagation) a step goes through the op's fake kernel: the
    prepared step, a C++ object called outside the dispatcher, read the fake tensors' memory from the second
    step on and crashed the process (a segmentation fault), on tcn_step and on TCN.step, also after real steps.
    In a child process, so that a crash is a failure here, not the end of the test run."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from hiertcn_fast.nn import TCN
        from hiertcn_fast.ops import CausalConvState, tcn_step
        tcn = TCN(4, (4, 4), kernel_size=3).eval()
        real = tcn.init_state(2)
        for _ in range(3):
            tcn.step(torch.randn(2, 4), real)  # prepared on real tensors first
        with FakeTensorMode(allow_non_fake_inputs=True):
            weights, biases = [torch.randn(4, 4, 3)], [torch.randn(4)]
            states = [CausalConvState.zeros(2, 4, 3)]
            fake_state = tcn.init_state(2)
            for _ in range(3):
                out = tcn_step(torch.randn(2, 4), weights, biases, states)
                assert type(out).__name__ == "FakeTensor" and out.shape == (2, 4)
                for state in (fake_state, real):
                    out = tcn.step(torch.randn(2, 4), state)
                    assert type(out).__name__ == "FakeTensor" and out.shape == (2, 4)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_step_ops_refuse_inputs_that_require_grad_and_change_nothing(backend):
    """The steps record no gradients: an input requiring grad silently got none (an output with requires_grad=False),
    where the modules' step() refuses it. Weights may require grad (a module's parameters do), and under no_grad the
    same inputs step."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 2, requires_grad=True)
    context, context_weight = torch.randn(2, 5), torch.randn(4, 5, 2)
    x, residual = torch.randn(2, 3), torch.randn(2, 4)
    state = CausalConvState.zeros(2, 3, 2, 1)
    for name in ("x", "context", "residual"):
        args = dict(x=x, context=context, residual=residual)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"causal_conv1d_step is for inference .* but {name} requires grad"):
            causal_conv1d_step(args["x"], weight, state, context=args["context"], context_weight=context_weight,
                               residual=args["residual"], backend=backend)
        assert state.position.tolist() == [0, 0] and not state.history.any()
    with torch.no_grad():
        causal_conv1d_step(x.requires_grad_(), weight, state, context=context, context_weight=context_weight,
                           residual=residual, backend=backend)
    assert state.position.tolist() == [1, 1]

    states = [CausalConvState.zeros(2, 3, 2, 1)]
    for name in ("x", "context"):
        args = dict(x=torch.randn(2, 3), context=context)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"tcn_step is for inference .* but {name} requires grad"):
            tcn_step(args["x"], [torch.randn(3, 3, 2, requires_grad=True)], [None], states, context=args["context"],
                     context_weight=torch.randn(3, 5, 2), backend=backend)
        assert states[0].position.tolist() == [0, 0]
