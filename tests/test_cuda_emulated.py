"""csrc/cuda's kernels, run on the CPU in the emulator of tests/cuda_emu (no GPU has run them).

The emulated library hiertcn_fast_emu is built from the kernels' own source (tests/cuda_emu/build.py);
here its ops are compared with the CPU kernels' (an independent implementation of the same ops) on
the same arguments, with what a GPU would do differently made visible:
- every call runs twice, the CUDA threads and blocks in ascending and then descending order, and must
  give the same bits (a missing barrier, or blocks writing one another's data, shows as a difference);
- every input lies in a buffer whose margins hold NaN (a read past its end poisons the result), and every
  output in one whose margins hold a sentinel that must survive (no write past its end), its own elements
  NaN until written (every element must be written);
- a launch the CUDA runtime would refuse, or a barrier some threads skip, is an error.
The CPU kernels' calls take the same guarded buffers, so that their reads and writes out of bounds fail too.
The float16 and bfloat16 kernels, which the CPU kernels do not have, are compared with the CPU kernels in
float32 on the same (rounded) inputs.

`make test-emulated` runs the op test suites with the cpu backend's ops routed to this build as well
(HIERTCN_EMULATE_CUDA=1, tests/cuda_emu/proxy.py).
"""

import pytest
import torch

from cuda_emu import build

from hiertcn_fast.ops.conv import pack_weight

MIN_MARGIN = 37
SENTINEL = 12345.0
HALF_TYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu():
    ops = build.load()
    yield ops
    ops.emu_set_reverse(False)


def cpu():
    return torch.ops.hiertcn_fast


# --- guarded buffers ---------------------------------------------------------------------------------------

def margin(numel):
    """Margins as long as the buffer: a kernel that overruns by a whole batch row still lands in one."""
    return max(MIN_MARGIN, numel)


def _in_buffer(shape, dtype, margin_value, interior=None):
    numel = 1
    for n in shape:
        numel *= n
    m = margin(numel)
    flat = torch.full((numel + 2 * m,), margin_value, dtype=dtype)
    inner = flat[m:m + numel].view(shape)
    if interior is not None:
        inner.copy_(interior)
    return inner


def guarded_input(values, pad_columns=0):
    """values in a buffer with NaN margins (huge ones for integers); with pad_columns, a view of a wider last
    dimension whose extra columns are NaN too (rows of stride > width)."""
    fill = float("nan") if values.is_floating_point() else (255 if values.dtype == torch.uint8 else 2 ** 40)
    if pad_columns == 0:
        return _in_buffer(tuple(values.shape), values.dtype, fill, values)
    wide = _in_buffer((*values.shape[:-1], values.shape[-1] + pad_columns), values.dtype, fill)
    wide[..., values.shape[-1]:] = fill
    wide[..., :values.shape[-1]] = values
    return wide[..., :values.shape[-1]]


def guarded_output(shape, dtype):
    """An output whose elements start NaN (0xFF bytes for integers) between sentinel margins."""
    if dtype.is_floating_point:
        return _in_buffer(tuple(shape), dtype, SENTINEL, torch.full(tuple(shape), float("nan"), dtype=dtype))
    return _in_buffer(tuple(shape), dtype, 77, torch.full(tuple(shape), -1, dtype=dtype))


def guarded_copy(t):
    """A copy of t (state updated in place) between sentinel margins."""
    copy = guarded_output(tuple(t.shape), t.dtype)
    copy.copy_(t)
    return copy


def assert_written_within(out, name):
    flat = out._base
    assert flat is not None, f"{name} is not a guarded output"
    m = margin(out.numel())
    margins = torch.cat([flat[:m], flat[-m:]])
    expected = SENTINEL if out.is_floating_point() else 77
    assert bool((margins == expected).all()), f"{name}: a kernel wrote outside it"
    if out.is_floating_point():
        assert not bool(out.isnan().any()), f"{name}: elements left unwritten (NaN)"


def same_bits(a, b):
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def both_orders(emu, run):
    """run() -> dict of result tensors, run in ascending then descending order; asserts that both give the
    same bits and that no launch error went unchecked; returns the results."""
    results = []
    for reverse in (False, True):
        emu.emu_set_reverse(reverse)
        try:
            before = list(emu.emu_counters())
            results.append(run())
            after = list(emu.emu_counters())
        finally:
            emu.emu_set_reverse(False)
        assert emu.emu_take_pending_error() == ""
        assert after[0] > before[0], "no kernel was launched: the emulated op did not run the CUDA kernels"
    for name, value in results[0].items():
        assert same_bits(value, results[1][name]), f"{name} differs between thread orders: a race"
    return results[1]


def close(actual, expected, dtype, name, scale=None):
    if dtype == torch.float64:
        rtol, atol = 1e-10, 1e-10
    elif dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5
    else:
        eps = torch.finfo(dtype).eps
        rtol, atol = 8 * eps, 8 * eps
    scale = scale if scale is not None else max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale, equal_nan=False,
                               msg=lambda m: f"{name}: {m}")


# --- the emulator itself -----------------------------------------------------------------------------------

def test_the_emulator_catches_what_a_gpu_would_not_forgive(emu):
    out = torch.zeros(128)
    runs = []
    for reverse in (False, True):
        emu.emu_set_reverse(reverse)
        try:
            emu.emu_self_test("racy", out)
        finally:
            emu.emu_set_reverse(False)
        runs.append(out[:64].clone())
    assert not torch.equal(runs[0], runs[1]), "a read of another thread's write without a barrier went unseen"
    emu.emu_self_test("barrier", out)
    assert torch.equal(out[:128], torch.arange(63, -1, -1, dtype=torch.float32).repeat(2))
    for which, message in [("divergent", "divergent __syncthreads"), ("empty_grid", "empty grid"),
                           ("too_many_threads", "block of"), ("shared_too_big", "must opt in"),
                           ("static_and_dynamic_too_big", "static and 20480 of dynamic")]:
        with pytest.raises(RuntimeError, match=message):
            emu.emu_self_test(which, out)
    emu.emu_self_test("static_and_dynamic_opt_in", out)
    assert bool((out[:64] == 3.0).all())
    emu.emu_self_test("shared_opt_in", out)
    assert bool(out[:64].isnan().all()), "dynamic shared memory is not poisoned before a block runs"
    out.zero_()
    emu.emu_self_test("static_shared_poison", out)
    assert bool(out[:64].isnan().all()), "static shared memory is not poisoned before a block runs"
    assert emu.emu_take_pending_error() == ""


def test_the_build_rewrites_fail_loudly_when_the_sources_change():
    with pytest.raises(build.RewriteError, match="a kernel launch"):
        build.rewrite("cuda/causal_conv.cu", "#include <ATen/cuda/CUDAContext.h>\nvoid f() {}\n")
    with pytest.raises(build.RewriteError, match="is_cpu"):
        build.rewrite("cpu/gru_recurrence.cpp", "TORCH_LIBRARY_IMPL(hiertcn_fast, CPU, m) {}\n"
                                                "TORCH_LIBRARY_IMPL(hiertcn_fast, CUDA, m) {}\nint x;\n")
    text = build.rewrite("cuda/causal_conv.cu", "#include <ATen/cuda/CUDAContext.h>\n"
                                                "void f() { k<T><<<grid, 128, smem, stream>>>(p); }\n"
                                                "TORCH_LIBRARY_IMPL(hiertcn_fast, CUDA, m) {}\n")
    assert "::cuda_emu::launch(k<T>, grid, 128, smem, stream)(p);" in text
    assert "TORCH_LIBRARY_IMPL(hiertcn_fast_emu, CPU, m)" in text and "ATen/cuda" not in text


# --- the causal convolution --------------------------------------------------------------------------------

# (batch, time, in, out, k, dilation, groups)
CONV_CASES = [
    (2, 37, 70, 130, 3, 2, 1),  # two blocks of output channels, two chunks of input channels, three time tiles
    (1, 1, 5, 7, 4, 3, 1),  # one step, shorter than the receptive field
    (3, 16, 8, 8, 5, 1, 8),  # depthwise, exactly one tile
    (2, 17, 12, 6, 2, 9, 3),  # grouped, a tile and a step
    (1, 40, 4, 4, 16, 64, 4),  # k = 16, dilation past the end of the sequence
    (2, 23, 3, 5, 1, 1, 1),  # k = 1
    (1, 33, 130, 130, 2, 1, 130),  # depthwise over two blocks of channels
    (2, 301, 6, 4, 3, 5, 2),  # several weight-gradient chunks, the last one shorter
]
# (bias, context table, residual, activation code, pre: None, "z" or "bits")
CONV_OPTIONS = [
    (True, True, True, 1, "bits"),
    (True, False, True, 2, "z"),
    (False, True, False, 3, "z"),
    (True, True, False, 0, "z"),
    (False, False, True, 1, "z"),
]


def conv_inputs(case, options, dtype):
    batch, time, c_in, c_out, k, dilation, groups = case
    has_bias, has_table, has_residual, activation, pre_mode = options
    g = torch.Generator().manual_seed(hash((case, options)) % 2 ** 31)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return dict(
        x=r(batch, time, c_in), weight=r(c_out, c_in // groups, k) / (c_in // groups * k) ** 0.5,
        bias=r(c_out) if has_bias else None, table=r(batch, k, c_out) if has_table else None,
        residual=r(batch, time, c_out) if has_residual else None, dilation=dilation, groups=groups,
        activation=activation, pre_mode=pre_mode, grad_out=r(batch, time, c_out))


def conv_forward(lib, inp, guard):
    x, residual = inp["x"], inp["residual"]
    batch, time, _ = x.shape
    c_out = inp["weight"].shape[0]
    wrap_in = guarded_input if guard else (lambda t, pad_columns=0: t)
    wrap_out = guarded_output if guard else (lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype)
                                             if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    out = wrap_out((batch, time, c_out), x.dtype)
    pre = None
    if inp["pre_mode"] == "z":
        pre = wrap_out((batch, time, c_out), x.dtype)
    elif inp["pre_mode"] == "bits":
        pre = wrap_out((batch, time, c_out), torch.uint8)
    opt = lambda t: None if t is None else wrap_in(t)  # noqa: E731
    lib.causal_conv1d_out(wrap_in(x, pad_columns=3), wrap_in(inp["weight"]), opt(inp["bias"]), opt(inp["table"]),
                          None if residual is None else wrap_in(residual, pad_columns=2), inp["dilation"],
                          inp["groups"], inp["activation"], out=out, pre=pre)
    if guard:
        assert_written_within(out, "out")
        if pre is not None:
            assert_written_within(pre, "pre")
    return out, pre


def conv_backward(lib, inp, pre, guard, want_x=True, want_weight=True):
    x, residual = inp["x"], inp["residual"]
    wrap_in = guarded_input if guard else (lambda t, pad_columns=0: t)
    wrap_out = guarded_output if guard else (lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype))
    grads = dict(grad_pre=wrap_out(inp["grad_out"].shape, x.dtype),
                 grad_x=wrap_out(x.shape, x.dtype) if want_x else None,
                 grad_weight=wrap_out(inp["weight"].shape, x.dtype) if want_weight else None,
                 grad_residual=None if residual is None else wrap_out(residual.shape, x.dtype))
    bits = inp["pre_mode"] == "bits"
    lib.causal_conv1d_backward_out(
        wrap_in(inp["grad_out"], pad_columns=1), wrap_in(x, pad_columns=3), wrap_in(inp["weight"]),
        None if pre is None else wrap_in(pre), None if residual is None or bits else wrap_in(residual, pad_columns=2),
        inp["dilation"], inp["groups"], inp["activation"], **grads)
    if guard:
        for name, t in grads.items():
            if t is not None:
                assert_written_within(t, name)
    return {k: v for k, v in grads.items() if v is not None}


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}t{}c{}o{}k{}d{}g{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv_forward_and_backward_equal_the_cpu_kernels(emu, case, options, dtype):
    if options[4] == "bits" and options[3] != 1:
        pytest.skip("sign bits are for relu only")
    inp = conv_inputs(case, options, dtype)
    out, pre = conv_forward(cpu(), inp, guard=True)
    expected = conv_backward(cpu(), inp, pre, guard=True)

    def run():
        e_out, e_pre = conv_forward(emu, inp, guard=True)
        result = dict(out=e_out, **conv_backward(emu, inp, e_pre, guard=True))
        if e_pre is not None:
            result["pre"] = e_pre
        return result

    got = both_orders(emu, run)
    close(got["out"], out, dtype, "out")
    if pre is not None:
        if pre.dtype == torch.uint8:
            assert torch.equal(got["pre"], pre), "relu sign bits"
        else:
            close(got["pre"], pre, dtype, "pre")
    for name, value in expected.items():
        close(got[name], value, dtype, name)


@pytest.mark.parametrize("want_x,want_weight", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[7]],
                         ids=lambda c: "b{}t{}c{}o{}k{}d{}g{}".format(*c))
def test_causal_conv_backward_computes_only_the_gradients_given(emu, case, want_x, want_weight):
    """grad_x or grad_weight None: that output's kernels are skipped, and the rest is what the full backward gives
    (the outputs not given have no buffer: a kernel writing one would write through a null pointer and crash)."""
    inp = conv_inputs(case, CONV_OPTIONS[0], torch.float64)
    out, pre = conv_forward(cpu(), inp, guard=True)
    expected = conv_backward(cpu(), inp, pre, guard=True)

    def run():
        _, e_pre = conv_forward(emu, inp, guard=True)
        return conv_backward(emu, inp, e_pre, guard=True, want_x=want_x, want_weight=want_weight)

    got = both_orders(emu, run)
    assert set(got) == {"grad_pre", "grad_residual"} | ({"grad_x"} if want_x else set()) | (
        {"grad_weight"} if want_weight else set())
    for name, value in got.items():
        close(value, expected[name], torch.float64, name)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[6]],
                         ids=lambda c: "b{}t{}c{}o{}k{}d{}g{}".format(*c))
def test_causal_conv_half_types_equal_the_cpu_kernels_in_float32(emu, case, dtype):
    options = CONV_OPTIONS[1]  # gelu, residual, pre as z
    inp = conv_inputs(case, options, dtype)
    wide = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    out, pre = conv_forward(cpu(), wide, guard=True)
    grads = conv_backward(cpu(), wide, pre, guard=True)

    def run():
        e_out, e_pre = conv_forward(emu, inp, guard=True)
        return dict(out=e_out, pre=e_pre, **conv_backward(emu, inp, e_pre, guard=True))

    got = both_orders(emu, run)
    close(got["out"], out, dtype, "out")
    close(got["pre"], pre, dtype, "pre")
    for name, value in grads.items():
        # The kernels round dL/dz to the storage type before the input and weight gradients use it.
        close(got[name], value, dtype, name, scale=float(value.abs().max()) * 4)


# --- one step of one layer ---------------------------------------------------------------------------------

def step_layer(lib, x, packed, bias, table, residual, dilation, groups, activation, history, position):
    out = guarded_output((x.shape[0], packed.shape[2] * groups), x.dtype)
    lib.causal_conv1d_step_out(guarded_input(x, pad_columns=2), guarded_input(packed), bias, table, residual,
                               dilation, groups, activation, history=history, position=position, out=out)
    assert_written_within(out, "out")
    return out


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv_step_equals_the_cpu_kernel_and_resets_rows_alone(emu, dtype, groups):
    batch, c_in, c_out, k, dilation, steps = 3, 6, 12, 3, 4, 14
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    weight, bias, table = r(c_out, c_in // groups, k), r(c_out), r(batch, k, c_out)
    packed = pack_weight(weight, groups)
    xs, residuals = r(steps, batch, c_in), r(steps, batch, c_out)
    history_shape = (batch, (k - 1) * dilation, c_in)
    state = dict(cpu=(torch.zeros(history_shape, dtype=dtype), torch.zeros(batch, dtype=torch.int64)),
                 emu=(guarded_output(history_shape, dtype).zero_(), guarded_output((batch,), torch.int64).zero_()))
    for t in range(steps):
        if t == 9:  # row 1 starts a new session: its position alone goes back to 0
            for history, position in state.values():
                position[1] = 0
        expected = step_layer(cpu(), xs[t], packed, bias, table, residuals[t], dilation, groups, 2,
                              *state["cpu"])

        def run():
            history, position = (guarded_copy(s) for s in state["emu"])
            out = step_layer(emu, xs[t], packed, bias, table, guarded_input(residuals[t]), dilation, groups, 2,
                             history, position)
            return dict(out=out, history=history, position=position)

        got = both_orders(emu, run)
        assert_written_within(got["history"], "history")
        state["emu"][0].copy_(got["history"])
        state["emu"][1].copy_(got["position"])
        close(got["out"], expected, dtype, f"step {t} out")
        assert torch.equal(got["history"], state["cpu"][0]), f"step {t}: the history differs from the CPU kernel's"
        assert torch.equal(got["position"], state["cpu"][1])


def test_causal_conv_step_poisons_a_row_with_a_negative_position_and_leaves_its_state(emu):
    batch, c_in, c_out, k, dilation = 2, 4, 5, 3, 2
    x, weight = torch.randn(batch, c_in), torch.randn(c_out, c_in, k)
    history = torch.randn(batch, (k - 1) * dilation, c_in)
    position = torch.tensor([-1, 3])
    before = history.clone()
    out = torch.zeros(batch, c_out)
    emu.causal_conv1d_step_out(x, pack_weight(weight, 1), None, None, None, dilation, 1, 0, history=history,
                               position=position, out=out)
    assert bool(out[0].isnan().all()) and not bool(out[1].isnan().any())
    assert torch.equal(history[0], before[0]) and position.tolist() == [-1, 4]
    assert not torch.equal(history[1], before[1])


# --- the whole stack's step --------------------------------------------------------------------------------

# Per layer (in, out, k, dilation, projection); the context enters the first layer.
STACKS = {
    # channels below the block's 512 threads: each output channel's sum split over several threads
    "split": ([(6, 8, 3, 1, True), (8, 8, 2, 4, False), (8, 5, 3, 2, True)], 3, torch.float32, 20),
    "split64": ([(6, 8, 3, 1, True), (8, 5, 3, 2, True)], 2, torch.float64, 12),
    # 512 channels and more: one thread per channel (and a second round of channels past 512)
    "wide": ([(520, 520, 2, 1, False), (520, 600, 2, 3, True)], 2, torch.float32, 8),
    # more than 48 KiB of shared memory: the kernel must opt in
    "opt_in": ([(3000, 4, 2, 1, True)], 2, torch.float64, 4),
}


def stack_inputs(layers, batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    packed, biases, projections, proj_biases = [], [], [], []
    for c_in, c_out, k, _, proj in layers:
        packed.append(pack_weight(r(c_out, c_in, k) / (c_in * k) ** 0.5, 1))
        biases.append(r(c_out))
        projections.append(r(c_in, c_out) / c_in ** 0.5 if proj else None)
        proj_biases.append(r(c_out) if proj else None)
    first = layers[0]
    return dict(packed=packed, biases=biases, projections=projections, proj_biases=proj_biases,
                table=r(batch, first[2], first[1]), term=r(batch, first[1]), dilations=[l[3] for l in layers])


def new_stack_state(layers, batch, dtype, guard):
    make = (lambda shape, dt: guarded_output(shape, dt).zero_()) if guard else (
        lambda shape, dt: torch.zeros(shape, dtype=dt))
    histories = [make((batch, (k - 1) * d, c_in), dtype) for c_in, _, k, d, _ in layers]
    positions = [make((batch,), torch.int64) for _ in layers]
    return histories, positions


def stack_step(lib, x, inp, histories, positions, guard):
    out = (guarded_output if guard else lambda s, dt: torch.full(s, float("nan"), dtype=dt))(
        (x.shape[0], inp["packed"][-1].shape[2]), x.dtype)
    lib.tcn_step_out(guarded_input(x) if guard else x, inp["packed"], inp["biases"], inp["projections"],
                     inp["proj_biases"], inp["table"], inp["term"], inp["dilations"], 1, histories=histories,
                     positions=positions, out=out)
    if guard:
        assert_written_within(out, "out")
    return out


@pytest.mark.parametrize("name", list(STACKS))
def test_tcn_step_equals_the_cpu_kernel(emu, name):
    layers, batch, dtype, steps = STACKS[name]
    inp = stack_inputs(layers, batch, dtype, seed=len(name))
    xs = torch.randn(steps, batch, layers[0][0], dtype=torch.float64).to(dtype)
    cpu_state = new_stack_state(layers, batch, dtype, guard=False)
    emu_state = new_stack_state(layers, batch, dtype, guard=False)
    for t in range(steps):
        expected = stack_step(cpu(), xs[t], inp, *cpu_state, guard=True)

        def run():
            histories = [guarded_copy(h) for h in emu_state[0]]
            positions = [guarded_copy(p) for p in emu_state[1]]
            out = stack_step(emu, xs[t], inp, histories, positions, guard=True)
            result = dict(out=out)
            result.update({f"history{l}": h for l, h in enumerate(histories)})
            result.update({f"position{l}": p for l, p in enumerate(positions)})
            return result

        got = both_orders(emu, run)
        for l in range(len(layers)):
            assert_written_within(got[f"history{l}"], f"history{l}")
            emu_state[0][l].copy_(got[f"history{l}"])
            emu_state[1][l].copy_(got[f"position{l}"])
            assert torch.equal(emu_state[1][l], cpu_state[1][l])
            close(emu_state[0][l], cpu_state[0][l], dtype, f"step {t} layer {l} history")
        # The first layer's history holds the inputs themselves.
        assert torch.equal(emu_state[0][0], cpu_state[0][0])
        close(got["out"], expected, dtype, f"step {t} out")


def test_tcn_step_poisons_only_the_row_with_a_negative_position(emu):
    layers, batch, dtype, _ = STACKS["split"]
    inp = stack_inputs(layers, batch, dtype, seed=3)
    histories, positions = new_stack_state(layers, batch, dtype, guard=True)
    x = torch.randn(batch, layers[0][0])
    stack_step(emu, x, inp, histories, positions, guard=True)
    positions[1][2] = -5  # row 2's state in the second layer is broken
    before = [h.clone() for h in histories]
    out = torch.zeros(batch, layers[-1][1])
    emu.tcn_step_out(x, inp["packed"], inp["biases"], inp["projections"], inp["proj_biases"], inp["table"],
                     inp["term"], inp["dilations"], 1, histories=histories, positions=positions, out=out)
    assert emu.emu_take_pending_error() == ""
    assert bool(out[2].isnan().all()) and not bool(out[:2].isnan().any())
    for l in range(len(layers)):
        assert torch.equal(histories[l][2], before[l][2]), f"layer {l}: the poisoned row's history changed"
    assert [int(p[2]) for p in positions] == [1, -5, 1]


def test_tcn_step_refuses_the_cpu_column_blocked_packing(emu):
    from hiertcn_fast.ops.conv import _blocked

    layers, batch, dtype, _ = STACKS["split"]
    inp = stack_inputs(layers, batch, dtype, seed=5)
    inp["packed"][1] = _blocked(inp["packed"][1], 4)  # (out / 4, k, in, 4): the CPU kernel's layout
    histories, positions = new_stack_state(layers, batch, dtype, guard=False)
    with pytest.raises(RuntimeError, match=r"takes the \(k, in, out\) weight packing; packed_weights\[1\] is "
                                           "column-blocked in blocks of 4"):
        stack_step(emu, torch.randn(batch, layers[0][0]), inp, histories, positions, guard=False)
    assert all(int(p.sum()) == 0 for p in positions), "a refused step moved a position"


# --- the GRU kernels and their drivers' CUDA branches ------------------------------------------------------

def gru_weights(layers, input_size, hidden, dtype, g, bias=True):
    weights = []
    for layer in range(layers):
        size = input_size if layer == 0 else hidden
        w = [torch.randn(3 * hidden, size, generator=g, dtype=torch.float64) / size ** 0.5,
             torch.randn(3 * hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5]
        if bias:
            w += [torch.randn(3 * hidden, generator=g, dtype=torch.float64) for _ in range(2)]
        weights.extend(t.to(dtype) for t in w)
    return weights


def gru_layer(lib, x, h0, weights, grad_output, guard, frozen=()):
    batch, time, input_size = x.shape
    hidden = h0.shape[1]
    wrap_in = guarded_input if guard else (lambda t, pad_columns=0: t)
    make = guarded_output if guard else (lambda s, dt: torch.full(s, float("nan"), dtype=dt))
    w_ih, w_hh, b_ih, b_hh = (list(weights) + [None, None])[:4]
    output, gates = make((batch, time, hidden), x.dtype), make((time, batch, 4 * hidden), x.dtype)
    args = [wrap_in(x, pad_columns=2), wrap_in(h0), wrap_in(w_ih), wrap_in(w_hh),
            None if b_ih is None else wrap_in(b_ih), None if b_hh is None else wrap_in(b_hh)]
    lib.gru_layer_forward_out(*args, output=output, gates=gates)
    grads = dict(grad_x=make(x.shape, x.dtype), grad_h0=None if "h0" in frozen else make(h0.shape, x.dtype),
                 grad_w_ih=None if "w_ih" in frozen else make(w_ih.shape, x.dtype),
                 grad_w_hh=None if "w_hh" in frozen else make(w_hh.shape, x.dtype),
                 grad_b_ih=None if b_ih is None or "bias" in frozen else make(b_ih.shape, x.dtype),
                 grad_b_hh=None if b_hh is None or "bias" in frozen else make(b_hh.shape, x.dtype))
    lib.gru_layer_backward_out(wrap_in(grad_output), args[0], args[1], args[2], args[3], output, gates, **grads)
    result = dict(output=output, **{k: v for k, v in grads.items() if v is not None})
    if guard:
        for name, t in result.items():
            assert_written_within(t, name)
    return result


# (batch, time, input, hidden, bias)
GRU_CASES = [(3, 7, 5, 9, True), (1, 1, 4, 3, False), (4, 13, 6, 300, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF_TYPES], ids=str)
@pytest.mark.parametrize("case", GRU_CASES, ids=lambda c: "b{}t{}i{}h{}-{}".format(*c))
def test_gru_layer_equals_the_cpu_kernels(emu, case, dtype):
    batch, time, input_size, hidden, bias = case
    g = torch.Generator().manual_seed(batch * 100 + hidden)
    x = torch.randn(batch, time, input_size, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype)
    grad_output = torch.randn(batch, time, hidden, generator=g, dtype=torch.float64).to(dtype)
    weights = gru_weights(1, input_size, hidden, dtype, g, bias)
    wide = torch.float32 if dtype in HALF_TYPES else dtype
    expected = gru_layer(cpu(), x.to(wide), h0.to(wide), [w.to(wide) for w in weights], grad_output.to(wide),
                         guard=True)
    got = both_orders(emu, lambda: gru_layer(emu, x, h0, weights, grad_output, guard=True))
    for name, value in expected.items():
        # Half types: the state is carried in float32 but every step's output, gates and gradients are stored
        # rounded; the gradients sum over the steps.
        scale = None if dtype not in HALF_TYPES else float(value.abs().max()) * 2 * time
        close(got[name], value, dtype, name, scale=scale)


@pytest.mark.parametrize("frozen", [("w_ih",), ("w_hh", "bias"), ("w_ih", "w_hh", "bias"), ("h0",),
                                    ("h0", "w_ih", "w_hh", "bias")], ids="+".join)
@pytest.mark.parametrize("case", [GRU_CASES[0], GRU_CASES[1]], ids=lambda c: "b{}t{}i{}h{}-{}".format(*c))
def test_gru_layer_backward_computes_only_the_gradients_given(emu, case, frozen):
    batch, time, input_size, hidden, bias = case
    g = torch.Generator().manual_seed(batch * 100 + hidden)
    x = torch.randn(batch, time, input_size, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64)
    grad_output = torch.randn(batch, time, hidden, generator=g, dtype=torch.float64)
    weights = gru_weights(1, input_size, hidden, torch.float64, g, bias)
    expected = gru_layer(cpu(), x, h0, weights, grad_output, guard=True)
    got = both_orders(emu, lambda: gru_layer(emu, x, h0, weights, grad_output, guard=True, frozen=frozen))
    assert "grad_w_ih" not in got if "w_ih" in frozen else "grad_w_ih" in got
    assert "grad_w_hh" not in got if "w_hh" in frozen else "grad_w_hh" in got
    assert "grad_h0" not in got if "h0" in frozen else "grad_h0" in got
    for name, value in got.items():
        close(value, expected[name], torch.float64, name)


def session_update(lib, items, lengths, h, keep, weights, proj, grad_out, guard, dropped=()):
    """dropped: the backward's gradient outputs left out (None; grad_weights empty)."""
    layers, batch, hidden = h.shape
    dim = items.shape[2]
    wrap_in = guarded_input if guard else (lambda t, pad_columns=0: t)
    make = guarded_output if guard else (lambda s, dt: torch.full(s, float("nan"), dtype=dt))
    dtype = items.dtype
    proj_weight, proj_bias = proj if proj is not None else (None, None)
    input_size = dim if proj_weight is None else proj_weight.shape[0]
    saved = dict(out=make((layers, batch, hidden), dtype), states=make((layers, batch, hidden), dtype),
                 session_mean=make((batch, dim), dtype),
                 projected=None if proj_weight is None else make((batch, input_size), dtype),
                 gates=make((layers, batch, 4 * hidden), dtype))
    args = [wrap_in(items, pad_columns=1), wrap_in(lengths), wrap_in(h), wrap_in(keep),
            [wrap_in(w) for w in weights], None if proj_weight is None else wrap_in(proj_weight),
            None if proj_bias is None else wrap_in(proj_bias)]
    lib.session_update_forward_out(*args, **saved)
    grads = dict(grad_item_embeddings=make(items.shape, dtype), grad_h=make(h.shape, dtype),
                 grad_weights=[make(w.shape, dtype) for w in weights],
                 grad_proj_weight=None if proj_weight is None else make(proj_weight.shape, dtype),
                 grad_proj_bias=None if proj_bias is None else make(proj_bias.shape, dtype))
    grads.update({name: [] if name == "grad_weights" else None for name in dropped})
    lib.session_update_backward_out(wrap_in(grad_out), args[0], args[1], args[2], args[3], args[4], args[5],
                                    saved["session_mean"], saved["projected"], saved["states"], saved["gates"],
                                    **grads)
    result = {k: v for k, v in saved.items() if v is not None and k != "gates"}
    result.update({k: v for k, v in grads.items() if v is not None and k != "grad_weights"})
    result.update({f"grad_weight{i}": w for i, w in enumerate(grads["grad_weights"])})
    if guard:
        for name, t in result.items():
            assert_written_within(t, name)
    return result


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF_TYPES], ids=str)
def test_session_update_equals_the_cpu_kernels(emu, dtype, projection):
    layers, batch, time, dim, hidden = 2, 5, 6, 7, 9
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    items, h, grad_out = r(batch, time, dim), r(layers, batch, hidden), r(layers, batch, hidden)
    lengths = torch.tensor([0, 1, 6, 3, 6])  # an empty session, a full one
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # two users end here
    input_size = 4 if projection else dim
    weights = gru_weights(layers, input_size, hidden, torch.float64, g)
    proj = (r(input_size, dim) / dim ** 0.5, r(input_size)) if projection else None
    wide = torch.float32 if dtype in HALF_TYPES else dtype

    def cast(dt):
        return dict(items=items.to(dtype).to(dt), lengths=lengths, h=h.to(dtype).to(dt),
                    keep=keep.to(dt), weights=[w.to(dtype).to(dt) for w in weights],
                    proj=None if proj is None else tuple(t.to(dtype).to(dt) for t in proj),
                    grad_out=grad_out.to(dtype).to(dt))

    expected = session_update(cpu(), **cast(wide), guard=True)
    got = both_orders(emu, lambda: session_update(emu, **cast(dtype), guard=True))
    for name, value in expected.items():
        scale = None if dtype not in HALF_TYPES else float(value.abs().max()) * 4
        close(got[name], value, dtype, name, scale=scale)


@pytest.mark.parametrize("dropped", [("grad_h",), ("grad_weights", "grad_proj_weight"),
                                     ("grad_item_embeddings", "grad_weights", "grad_proj_bias")], ids="+".join)
@pytest.mark.parametrize("projection", [False, True])
def test_session_update_backward_computes_only_the_gradients_given(emu, projection, dropped):
    """Gradient outputs left out (what wants no gradient): every other one as the CPU kernels give it in full."""
    layers, batch, time, dim, hidden = 2, 5, 6, 7, 9
    g = torch.Generator().manual_seed(12)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    items, h, grad_out = r(batch, time, dim), r(layers, batch, hidden), r(layers, batch, hidden)
    lengths, keep = torch.tensor([0, 1, 6, 3, 6]), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    input_size = 4 if projection else dim
    args = dict(items=items, lengths=lengths, h=h, keep=keep, weights=gru_weights(layers, input_size, hidden,
                                                                                   torch.float64, g),
                proj=(r(input_size, dim) / dim ** 0.5, r(input_size)) if projection else None, grad_out=grad_out)
    expected = session_update(cpu(), **args, guard=True)
    got = both_orders(emu, lambda: session_update(emu, **args, guard=True, dropped=dropped))
    assert set(got) == {name for name in expected
                        if name not in dropped and not (name.startswith("grad_weight") and "grad_weights" in dropped)}
    for name, value in got.items():
        close(value, expected[name], torch.float64, name)


def test_the_proxy_routes_the_cpu_backend_through_the_emulated_kernels(emu, monkeypatch):
    from cuda_emu import proxy

    from hiertcn_fast.ops import causal_conv1d

    monkeypatch.setattr(torch.ops, "hiertcn_fast", proxy.EmulatedOps(torch.ops.hiertcn_fast, emu))
    before = list(emu.emu_counters())
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    y = causal_conv1d(x, w, dilation=2, activation="relu", backend="cpu")
    y.sum().backward()
    after = list(emu.emu_counters())
    assert after[0] >= before[0] + 2 * 4, "forward and backward (four kernels) each run in both orders"
    monkeypatch.undo()
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    expected = causal_conv1d(x2, w2, dilation=2, activation="relu", backend="cpu")
    expected.sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_the_proxy_runs_the_ops_that_return_their_results_in_both_orders_too(emu, monkeypatch):
    """gru_cell and session_update, which the ops call through their overload (op.default), run twice."""
    from cuda_emu import proxy

    from hiertcn_fast.ops import gru_cell

    torch.manual_seed(5)
    x, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    w_ih, w_hh = torch.randn(21, 5, dtype=torch.float64), torch.randn(21, 7, dtype=torch.float64)
    b_ih, b_hh = torch.randn(21, dtype=torch.float64), torch.randn(21, dtype=torch.float64)
    args = (x, h, w_ih, w_hh, b_ih, b_hh)
    before = emu.emu_counters()[0]
    direct = emu.gru_cell.default(*args)
    once = emu.emu_counters()[0] - before
    assert once >= 1
    monkeypatch.setattr(torch.ops, "hiertcn_fast", proxy.EmulatedOps(torch.ops.hiertcn_fast, emu))
    before = emu.emu_counters()[0]
    got = gru_cell(*args, backend="cpu")
    assert emu.emu_counters()[0] - before == 2 * once, "gru_cell.default did not run in both orders"
    assert same_bits(got, direct)
    monkeypatch.undo()
    torch.testing.assert_close(got, gru_cell(*args, backend="cpu"), rtol=1e-12, atol=1e-12)


# --- cases added by mutation testing (a mutant of the kernels survived the tests above without them) ------

def test_causal_conv_tap_whose_window_ends_at_step_zero(emu):
    """A tap whose offset is exactly kTimeTile - 1 = 15 reads only step 0 in the first tile (s_last == 0)."""
    case, options = (1, 20, 4, 4, 2, 15, 1), CONV_OPTIONS[1]
    inp = conv_inputs(case, options, torch.float64)
    out, _ = conv_forward(cpu(), inp, guard=True)
    got = both_orders(emu, lambda: dict(out=conv_forward(emu, inp, guard=True)[0]))
    close(got["out"], out, torch.float64, "out")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", ["split", "wide"])
def test_tcn_step_half_types_equal_the_cpu_kernel_in_float32(emu, name, dtype):
    layers, batch, _, steps = STACKS[name]
    steps = min(steps, 4)
    inp = stack_inputs(layers, batch, dtype, seed=len(name))
    wide = {k: ([None if t is None else t.float() for t in v] if isinstance(v, list) and k != "dilations" else
                (v.float() if isinstance(v, torch.Tensor) else v)) for k, v in inp.items()}
    xs = torch.randn(steps, batch, layers[0][0], dtype=torch.float64).to(dtype)
    cpu_state = new_stack_state(layers, batch, torch.float32, guard=False)
    emu_state = new_stack_state(layers, batch, dtype, guard=False)
    for t in range(steps):
        expected = stack_step(cpu(), xs[t].float(), wide, *cpu_state, guard=True)

        def run():
            histories = [guarded_copy(h) for h in emu_state[0]]
            positions = [guarded_copy(p) for p in emu_state[1]]
            out = stack_step(emu, xs[t], inp, histories, positions, guard=True)
            return dict(out=out, **{f"h{l}": h for l, h in enumerate(histories)},
                        **{f"p{l}": p for l, p in enumerate(positions)})

        got = both_orders(emu, run)
        for l in range(len(layers)):
            emu_state[0][l].copy_(got[f"h{l}"])
            emu_state[1][l].copy_(got[f"p{l}"])
        close(got["out"], expected, dtype, f"step {t} out", scale=float(expected.abs().max()) * 4)


def rounded_stack_step(x, inp, histories, positions, dtype):
    """The stack step (relu) in float64, rounded to dtype wherever the CUDA kernel stores in its type T: every
    layer's output (the next layer's input), the projection with its bias, the residual with the context's term,
    and the histories. Updates histories (dtype) and positions in place; returns the output in dtype."""
    r = lambda t: t.to(dtype).double()  # noqa: E731
    v = x.double()
    batch = x.shape[0]
    for l, dilation in enumerate(inp["dilations"]):
        packed = inp["packed"][l].double()
        k, c_in, c_out = packed.shape
        history_length = (k - 1) * dilation
        out = torch.empty(batch, c_out, dtype=torch.float64)
        for b in range(batch):
            pos = int(positions[l][b])
            z = inp["biases"][l].double().clone()
            for j in range(k):
                lag = (k - 1 - j) * dilation
                if lag <= pos:
                    source = v[b] if lag == 0 else histories[l][b, (pos - lag) % history_length].double()
                    z += source @ packed[j]
            if l == 0:
                z += inp["table"][b, min(pos // dilation, k - 1)].double()
            projection = inp["projections"][l]
            residual = v[b] if projection is None else r(v[b] @ projection.double() + inp["proj_biases"][l].double())
            if l == 0:
                residual = r(residual + inp["term"][b].double())
            out[b] = r(torch.relu(torch.relu(z) + residual))
            if history_length:
                histories[l][b, pos % history_length] = v[b].to(dtype)
            positions[l][b] = pos + 1
        v = out
    return v.to(dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_tcn_step_half_types_round_every_layer_output_to_their_type(emu, dtype):
    """The stack kernel rounds each layer's output to T before the next layer reads it, as the per-layer ops (and
    the histories) store it: against a float64 step with the same rounding points, the same bits but where the
    float32 sums fall on the other side of a rounding boundary (rare; none with these inputs). Without the
    rounding, about a fifth of the outputs differ."""
    layers, batch, _, steps = STACKS["split"]
    inp = stack_inputs(layers, batch, dtype, seed=11)
    xs = torch.randn(steps, batch, layers[0][0], dtype=torch.float64).to(dtype)
    ref_state = new_stack_state(layers, batch, dtype, guard=False)
    emu_state = new_stack_state(layers, batch, dtype, guard=False)
    outs, expected = [], []
    for t in range(steps):
        expected.append(rounded_stack_step(xs[t], inp, *ref_state, dtype))
        outs.append(stack_step(emu, xs[t], inp, *emu_state, guard=False))
        for l in range(len(layers)):
            assert torch.equal(emu_state[1][l], ref_state[1][l])
    got, want = torch.stack(outs).float(), torch.stack(expected).float()
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((got - want).abs() <= ulp).all()), "an output more than one unit in the last place away"
    differing = int((got != want).sum())
    assert differing <= max(1, want.numel() // 100), f"{differing} of {want.numel()} outputs differ in their last bit"
    for l in range(len(layers)):
        history_differing = int((emu_state[0][l] != ref_state[0][l]).sum())
        assert history_differing <= max(1, emu_state[0][l].numel() // 100), f"layer {l}'s history"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gru_gates_ops_with_strided_rows_equal_the_cpu_kernels(emu, dtype):
    batch, hidden = 5, 7
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    gi, gh, h, grad = r(batch, 3 * hidden), r(batch, 3 * hidden), r(batch, hidden), r(batch, hidden)

    def call(lib, guard):
        wrap = (lambda t, k: guarded_input(t, pad_columns=k)) if guard else (lambda t, k: t)
        make = guarded_output if guard else (lambda s, dt: torch.full(s, float("nan"), dtype=dt))
        out = make((batch, hidden), dtype)
        lib.gru_gates_out(wrap(gi, 2), wrap(gh, 5), wrap(h, 3), out=out)
        grads = dict(grad_gi=make((batch, 3 * hidden), dtype), grad_gh=make((batch, 3 * hidden), dtype),
                     grad_h=make((batch, hidden), dtype))
        lib.gru_gates_backward_out(wrap(grad, 1), wrap(gi, 2), wrap(gh, 5), wrap(h, 3), **grads)
        result = dict(out=out, **grads)
        if guard:
            for name, t in result.items():
                assert_written_within(t, name)
        return result

    expected = call(cpu(), guard=True)
    got = both_orders(emu, lambda: call(emu, guard=True))
    for name, value in expected.items():
        close(got[name], value, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_session_mean_has_the_cpu_kernels_bits(emu, dtype):
    """The kernel sums in the CPU kernel's order and scales alike: the same bits, not only close."""
    layers, batch, time, dim, hidden = 1, 5, 6, 7, 3
    g = torch.Generator().manual_seed(5)
    items = torch.randn(batch, time, dim, generator=g, dtype=torch.float64).to(dtype) * 3
    lengths, keep = torch.tensor([0, 1, 6, 3, 5]), torch.ones(batch, dtype=dtype)
    h, grad_out = torch.randn(layers, batch, hidden, dtype=dtype), torch.randn(layers, batch, hidden, dtype=dtype)
    weights = gru_weights(layers, dim, hidden, dtype, g)
    expected = session_update(cpu(), items, lengths, h, keep, weights, None, grad_out, guard=True)
    got = both_orders(emu, lambda: session_update(emu, items, lengths, h, keep, weights, None, grad_out, guard=True))
    assert same_bits(got["session_mean"], expected["session_mean"])


def test_the_proxys_bit_comparison_takes_a_one_element_view_of_any_stride():
    """The emulator's race check compares arguments bit for bit; a (1,) bias sliced from a longer vector (stride 2,
    which contiguous() and clone() keep) made its view as bytes raise instead."""
    from cuda_emu.proxy import _same_bits

    bias = torch.randn(2, dtype=torch.float64)[::2]
    assert bias.stride() == (2,)
    assert _same_bits(bias, bias.clone())
    assert not _same_bits(bias, bias + 1)
    assert _same_bits(torch.arange(6.0).view(2, 3).t(), torch.arange(6.0).view(2, 3).t().contiguous())
