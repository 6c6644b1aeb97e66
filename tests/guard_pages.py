"""Runs the compiled ops with every input against an inaccessible page (tests/test_guard_pages.py runs it).

A kernel that reads past the end (or before the start) of an input, even a value it then never uses, touches
the page and the process dies of SIGSEGV: the NaN margins of the other tests catch only reads whose values
reach a result. Every input tensor (and the state histories the steps read and write) lives in its own mapping
whose neighbouring pages are PROT_NONE, once ending exactly where the page after it starts ("end") and once
starting exactly where the page before it ends ("start"). The kernels' entry points (the *_out ops) also get every
tensor argument so placed, for the call: the buffers an op makes for itself (packed weights, saved
pre-activations, the pre-activation gradient, outputs) are guarded too, against reads and writes.

    python tests/guard_pages.py {cpu|emulated|triton|probe} {end|start}

prints each case's name before running it, then the *_out ops it guarded, and "done" at the end: a crash names
its case on the line before.
"emulated" runs csrc/cuda's kernels in the CPU emulator (tests/cuda_emu) instead of the CPU kernels, "triton" the
Triton kernels in Triton's interpreter (which reads and writes the tensors' memory where their masks allow); "probe"
reads the byte just past a guarded tensor (end) or just before it (start), and must die.
"""

import ctypes
import mmap
import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "triton":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels interpreted on CPU tensors

import torch  # noqa: E402

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_keep = []  # the mappings' ctypes arrays: never unmapped (the process is short-lived)


def guarded(values, side, keep_strides=False):
    """A copy of values in a mapping of its own, against a PROT_NONE page at its end (side "end") or its start
    ("start"). Its strides are made contiguous, or with keep_strides kept (for strides that neither overlap nor
    go backwards): the first and the last element it spans then lie against the pages."""
    values = values.detach()
    if keep_strides and not values.is_contiguous() and all(st > 0 for st in values.stride()):
        span = 1 + sum((n - 1) * st for n, st in zip(values.shape, values.stride()))
        room = guarded(torch.zeros(span, dtype=values.dtype), side)
        out = room.as_strided(values.shape, values.stride())
        out.copy_(values)
        return out
    values = values.contiguous()
    nbytes = values.numel() * values.element_size()
    data_pages = max(1, -(-nbytes // PAGE))
    total = (data_pages + 2) * PAGE
    address = _libc.mmap(None, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    for page in (0, data_pages + 1):
        if _libc.mprotect(address + page * PAGE, PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    buffer = (ctypes.c_char * total).from_address(address)
    _keep.append(buffer)
    offset = PAGE + (data_pages * PAGE - nbytes if side == "end" else 0)
    out = torch.frombuffer(buffer, dtype=values.dtype, count=values.numel(), offset=offset).view(values.shape)
    out.copy_(values)
    return out


class GuardedOps:
    """torch.ops.hiertcn_fast with every tensor argument of its *_out ops moved, for the call, into a guarded
    mapping of its own: the kernels' entry points take the buffers an op makes for itself too (packed weights,
    saved pre-activations and gates, the pre-activation gradient, partial sums, outputs), which the cases cannot
    reach, so a read or a write past any of them dies as well. The arguments the op writes are copied back."""

    seen = set()  # the names of the ops called through it

    def __init__(self, real, side):
        self._real, self._side = real, side

    def __getattr__(self, name):
        op = getattr(self._real, name)
        return _GuardedOp(op, self._side, name) if name.endswith("_out") else op


class _GuardedOp:
    def __init__(self, op, side, name):
        self._op, self._side, self._name = op, side, name
        overload = op if isinstance(op, torch._ops.OpOverload) else op.default
        arguments = overload._schema.arguments
        self._names = [a.name for a in arguments]
        self._written = {a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write}

    def __call__(self, *args, **kwargs):
        bound = dict(zip(self._names, args), **kwargs)
        moved, written = {}, []  # id -> guarded copy (one per tensor, so arguments that alias still do)

        def move(name, value):
            if isinstance(value, torch.Tensor):
                if value.numel() == 0:
                    return value
                if id(value) not in moved:
                    moved[id(value)] = guarded(value, self._side, keep_strides=True)
                    if name in self._written:
                        written.append((value, moved[id(value)]))
                return moved[id(value)]
            if isinstance(value, (list, tuple)):
                return type(value)(move(name, v) for v in value)
            return value

        GuardedOps.seen.add(self._name)
        result = self._op(**{name: move(name, value) for name, value in bound.items()})
        assert result is None, "an *_out op returned a value"
        with torch.no_grad():
            for original, copy in written:
                original.copy_(copy)

    def __getattr__(self, name):
        attr = getattr(self._op, name)
        return _GuardedOp(attr, self._side, self._name) if isinstance(attr, torch._ops.OpOverload) else attr


def cases(side, backend):
    from hiertcn_fast import nn as fnn
    from hiertcn_fast import ops

    g = lambda t: guarded(t, side)  # noqa: E731

    def conv(name, batch, time, c_in, c_out, k, dilation, groups, context=0, activation=None, residual=False,
             dtype=torch.float32):
        def run():
            torch.manual_seed(0)
            x = g(torch.randn(batch, time, c_in, dtype=dtype)).requires_grad_()
            w = g(torch.randn(c_out, c_in // groups, k, dtype=dtype)).requires_grad_()
            b = g(torch.randn(c_out, dtype=dtype)).requires_grad_()
            kwargs = dict(dilation=dilation, groups=groups, activation=activation, backend=backend)
            if context:
                kwargs["context"] = g(torch.randn(batch, context, dtype=dtype)).requires_grad_()
                kwargs["context_weight"] = g(torch.randn(c_out, context, k, dtype=dtype)).requires_grad_()
            if residual:
                kwargs["residual"] = g(torch.randn(batch, time, c_out, dtype=dtype)).requires_grad_()
            y = ops.causal_conv1d(x, w, b, **kwargs)
            y.backward(g(torch.randn(y.shape, dtype=dtype)))
            assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())
        return name, run

    def tcn_steps(name, batch, c_in, channels, k, context=0, dtype=torch.float32):
        def run():
            torch.manual_seed(1)
            tcn = fnn.TCN(c_in, channels, kernel_size=k, context_channels=context, backend=backend, dtype=dtype).eval()
            state = tcn.init_state(batch)
            for layer in state.layers:
                layer.history = g(torch.randn(layer.history.shape, dtype=dtype))
                layer.position = g(layer.position)
            ctx = g(torch.randn(batch, context, dtype=dtype)) if context else None
            with torch.no_grad():
                for t in range(2 * k + 3):
                    out = tcn.step(g(torch.randn(batch, c_in, dtype=dtype)), state, ctx)
                    assert bool(torch.isfinite(out).all())
                    if t == k:
                        state.reset(torch.arange(batch) % 2 == 0)
        return name, run

    def one_layer_steps(name, batch, c_in, c_out, k, dilation, groups, dtype=torch.float32):
        def run():
            torch.manual_seed(2)
            w = g(torch.randn(c_out, c_in // groups, k, dtype=dtype))
            b = g(torch.randn(c_out, dtype=dtype))
            state = fnn.CausalConv1d(c_in, c_out, k, dilation=dilation, groups=groups, dtype=dtype).init_state(batch)
            state.history = g(torch.randn(state.history.shape, dtype=dtype))
            state.position = g(state.position)
            for _ in range(2 * k * dilation + 1):
                y = ops.causal_conv1d_step(g(torch.randn(batch, c_in, dtype=dtype)), w, state, b, groups=groups,
                                           activation="tanh", backend=backend)
                assert bool(torch.isfinite(y).all())
        return name, run

    def gru_cell(name, batch, input_size, hidden, bias=True, dtype=torch.float32):
        def run():
            torch.manual_seed(3)
            args = [g(torch.randn(batch, input_size, dtype=dtype)), g(torch.randn(batch, hidden, dtype=dtype)),
                    g(torch.randn(3 * hidden, input_size, dtype=dtype)), g(torch.randn(3 * hidden, hidden, dtype=dtype))]
            if bias:
                args += [g(torch.randn(3 * hidden, dtype=dtype)), g(torch.randn(3 * hidden, dtype=dtype))]
            args = [a.requires_grad_() for a in args]
            h = ops.gru_cell(*args, backend=backend)
            h.backward(g(torch.randn(h.shape, dtype=dtype)))
            assert bool(torch.isfinite(h).all()) and all(bool(torch.isfinite(a.grad).all()) for a in args)
        return name, run

    def stack_weights(input_size, hidden, layers, dtype):
        """Guarded (w_ih, w_hh, b_ih, b_hh) per layer, requiring gradients."""
        weights = []
        for layer in range(layers):
            width = input_size if layer == 0 else hidden
            shapes = [(3 * hidden, width), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,)]
            weights.append([g(torch.randn(shape, dtype=dtype)).requires_grad_() for shape in shapes])
        return weights

    def gru(name, batch, time, input_size, hidden, layers, dtype=torch.float32):
        def run():
            torch.manual_seed(4)
            x = g(torch.randn(batch, time, input_size, dtype=dtype)).requires_grad_()
            h0 = g(torch.randn(layers, batch, hidden, dtype=dtype)).requires_grad_()
            weights = stack_weights(input_size, hidden, layers, dtype)
            out, h_n = ops.gru(x, h0, weights, num_layers=layers, backend=backend)
            (out * g(torch.randn(out.shape, dtype=dtype))).sum().add(h_n.sum()).backward()
            assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(x.grad).all())
        return name, run

    def gru_layer_ops(name, batch, time, input_size, hidden, dtype=torch.float32):
        # ops.gru calls the layer ops from C++ (its node, gru_layer), past this module's hook on torch.ops; the
        # autograd.Function that torch.compile traces calls them from Python, with the buffers it makes.
        def run():
            from hiertcn_fast.ops.gru import _GruLayerFunction

            torch.manual_seed(6)
            x = g(torch.randn(batch, time, input_size, dtype=dtype)).requires_grad_()
            h0 = g(torch.randn(batch, hidden, dtype=dtype)).requires_grad_()
            weights = stack_weights(input_size, hidden, 1, dtype)[0]
            out = _GruLayerFunction.apply(x, h0, *weights, False)
            out.backward(g(torch.randn(out.shape, dtype=dtype)))
            assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(x.grad).all())
        return name, run

    def session_update(name, batch, time, dim, hidden, layers, proj=False, dtype=torch.float32):
        def run():
            torch.manual_seed(5)
            width = hidden if proj else dim
            items = g(torch.randn(batch, time, dim, dtype=dtype)).requires_grad_()
            lengths = g(torch.arange(batch) % (time + 1))
            h = g(torch.randn(layers, batch, hidden, dtype=dtype)).requires_grad_()
            keep = g((torch.arange(batch) % 3 != 1).to(dtype))
            weights = stack_weights(width, hidden, layers, dtype)
            kwargs = {}
            if proj:
                kwargs = dict(proj_weight=g(torch.randn(hidden, dim, dtype=dtype)).requires_grad_(),
                              proj_bias=g(torch.randn(hidden, dtype=dtype)).requires_grad_())
            out = ops.session_update(items, lengths, h, keep, weights, backend=backend, **kwargs)
            out.backward(g(torch.randn(out.shape, dtype=dtype)))
            assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(items.grad).all())
        return name, run

    def gru_gates(name, batch, hidden, strided=False, dtype=torch.float32):
        def run():
            torch.manual_seed(6)
            args = [g(torch.randn(batch, 3 * hidden, dtype=dtype)).requires_grad_(),
                    g(torch.randn(batch, 3 * hidden, dtype=dtype)).requires_grad_(),
                    g(torch.randn(batch, hidden, dtype=dtype)).requires_grad_()]
            inputs = args
            if strided:  # rows of wider tensors: the kernels index gi, gh and h by their row strides
                inputs = [torch.cat([a, torch.zeros(batch, 5, dtype=dtype)], 1)[:, :a.shape[1]] for a in args]
            h = ops.gru_gates(*inputs, backend=backend)
            h.backward(g(torch.randn(h.shape, dtype=dtype)))
            assert bool(torch.isfinite(h).all()) and all(bool(torch.isfinite(a.grad).all()) for a in args)
        return name, run

    def cross_entropy(name, events, dim, classes, bias=True, dtype=torch.float32):
        def run():
            torch.manual_seed(7)
            features = g(torch.randn(events, dim, dtype=dtype)).requires_grad_()
            weight = g(torch.randn(classes, dim, dtype=dtype)).requires_grad_()
            b = g(torch.randn(classes, dtype=dtype)).requires_grad_() if bias else None
            targets = g(torch.arange(events) * 7 % classes)
            loss = ops.linear_cross_entropy(features, weight, b, targets, backend=backend)
            loss.backward()
            assert bool(torch.isfinite(loss)) and bool(torch.isfinite(weight.grad).all())
        return name, run

    def row_pass(name, rows, classes, bias=True, dtype=torch.float32):
        # The loss op calls its row pass from C++, past this module's hook on torch.ops: called here directly.
        def run():
            torch.manual_seed(7)
            z = torch.randn(rows, classes, dtype=dtype)
            b = torch.randn(classes, dtype=dtype) if bias else None
            targets = torch.arange(rows) * 5 % classes
            logits, loss = g(z), g(torch.empty(rows, dtype=dtype))
            torch.ops.hiertcn_fast.softmax_xent_out(logits, g(targets), None if b is None else g(b), loss=loss)
            shifted = z if b is None else z + b
            want = torch.logsumexp(shifted, 1) - shifted.gather(1, targets[:, None])[:, 0]
            assert torch.allclose(loss, want, rtol=1e-5, atol=1e-5)
        return name, run

    return [
        # output channels past a multiple of the CUDA kernels' 128 threads; depthwise and grouped
        conv("conv depthwise 130", 2, 19, 130, 130, 3, 4, 130),
        conv("conv grouped", 2, 17, 12, 18, 4, 3, 6, activation="gelu"),
        conv("conv dense context residual", 3, 21, 16, 16, 5, 2, 1, context=24, activation="relu", residual=True),
        conv("conv dense 130 to 131", 2, 23, 130, 131, 2, 1, 1, activation="tanh"),
        conv("conv time 1", 2, 1, 8, 8, 5, 3, 1, context=4),
        conv("conv long dilation", 1, 37, 5, 7, 3, 16, 1, dtype=torch.float64 if backend == "cpu" else torch.float32),
        tcn_steps("tcn step", 3, 16, [16, 16, 16], 3, context=8),
        tcn_steps("tcn step wide", 2, 130, [130, 131], 2),
        one_layer_steps("one-layer step dense", 3, 6, 5, 3, 2, 1),
        one_layer_steps("one-layer step depthwise", 2, 130, 130, 2, 3, 130),
        gru_cell("gru_cell", 3, 5, 7),
        gru_cell("gru_cell no bias", 2, 130, 129, bias=False),
        gru("gru 2 layers", 3, 7, 5, 9, 2),
        gru("gru hidden 130", 2, 3, 4, 130, 1),
        *([gru_layer_ops("gru layer ops", 3, 7, 5, 130)] if backend == "cpu" else []),
        session_update("session_update", 5, 4, 6, 7, 2),
        session_update("session_update projected", 4, 3, 10, 6, 1, proj=True),
        gru_gates("gru_gates", 3, 130),
        gru_gates("gru_gates strided rows", 3, 130, strided=True),
    ] + ([] if backend == "triton" else [  # (no Triton kernel)
        cross_entropy("linear_cross_entropy", 5, 9, 1001),
        cross_entropy("linear_cross_entropy no bias", 3, 130, 77, bias=False),
        row_pass("softmax_xent_out rows", 5, 1001),
        row_pass("softmax_xent_out rows no bias", 3, 77, bias=False),
    ])


def main(mode, side):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if mode == "probe":
        t = guarded(torch.arange(10, dtype=torch.float32), side)
        assert torch.equal(t, torch.arange(10, dtype=torch.float32))
        print("probing", flush=True)
        ctypes.string_at(t.data_ptr() + t.numel() * t.element_size() if side == "end" else t.data_ptr() - 1, 1)
        print("done", flush=True)  # not reached: the read above dies of SIGSEGV
        return
    if mode == "emulated":
        from cuda_emu import proxy
        proxy.install()
    elif mode not in ("cpu", "triton"):
        raise SystemExit(f"mode: cpu, emulated or triton, not {mode!r}")
    if side not in ("end", "start"):
        raise SystemExit(f"side: end or start, not {side!r}")
    torch.ops.hiertcn_fast = GuardedOps(torch.ops.hiertcn_fast, side)
    torch.set_num_threads(2)
    for name, run in cases(side, "triton" if mode == "triton" else "cpu"):
        print(name, flush=True)
        run()
    print("guarded:", " ".join(sorted(GuardedOps.seen)), flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
