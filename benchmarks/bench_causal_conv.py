"""causal_conv1d and causal_conv1d_step against the PyTorch way, in the same run.

The PyTorch way of a causal conv block on channels-last input: transpose, F.pad on the left, F.conv1d,
transpose back, then bias (inside conv1d), activation and residual as separate ops; with a context
vector, tile it over time and concatenate it to the input first (what HierTCN's reference code does).
torch.compile of the same function is the third variant. For the step (a TCN stack of residual
blocks, one event per row), the PyTorch way recomputes the stack's newest output from the window of
the last receptive-field inputs.

Those are the baselines the issue names. Two more PyTorch ways are timed beside them, so that the speed-up over
the better PyTorch code is on record too: the context added through its per-tap table instead of concatenated
("torch eager, context table"), and the stack stepped in plain PyTorch with a ring buffer per layer ("torch eager,
streaming step"): the same O(k) work per event as TCN.step, without fused kernels. On the CPU, a dense float32 case
also times hiertcn_fast with each of its two routes forced ("hiertcn_fast, BLAS route" and "hiertcn_fast,
micro-kernels": ops.set_cpu_conv_blas), the measurement behind the "auto" rule of ops.cpu_conv_blas.

FLOPs are the nominal ones of the concatenated convolution (2 per multiply-add; forward + backward
counted as 3x forward), so the fast variant's TFLOP/s is an effective rate: it skips the context's
per-step work. Bytes: activations and weights read once, outputs written once.
"""

import torch
import torch.nn.functional as F

import harness
from hiertcn_fast.nn import TCN
from hiertcn_fast import _extension
from hiertcn_fast.ops import causal_conv1d, set_cpu_conv_blas


def torch_way(x, weight, bias, dilation, groups, context, context_weight, residual):
    """(batch, time, in) -> (batch, time, out) = relu(relu(conv + bias) + residual), context concatenated."""
    if context is not None:
        x = torch.cat([x, context[:, None, :].expand(-1, x.shape[1], -1)], dim=2)
        weight = torch.cat([weight, context_weight], dim=1)
    k = weight.shape[2]
    y = F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) * dilation, 0)), weight, bias, dilation=dilation, groups=groups)
    y = torch.relu(y.transpose(1, 2))
    return y if residual is None else torch.relu(y + residual)


def torch_way_context_table(x, weight, bias, dilation, groups, context, context_weight, residual):
    """The same block in plain PyTorch without concatenating the context: F.conv1d over x alone, plus the
    context's term, which is constant over time except where a tap falls before the start. Per tap j the
    context's product (batch, out); step t sees the taps j >= k - 1 - min(t // dilation, k - 1), so its term is a
    suffix sum over taps, read per step. (The better way a PyTorch user can write; an extra baseline.)"""
    k = weight.shape[2]
    y = F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) * dilation, 0)), weight, bias, dilation=dilation, groups=groups)
    y = y.transpose(1, 2)
    per_tap = torch.einsum("bc,ocj->bjo", context, context_weight)             # (batch, k, out)
    suffix = per_tap.flip(1).cumsum(1)                                        # suffix[:, m]: the last m + 1 taps
    live = torch.clamp(torch.arange(x.shape[1], device=x.device) // dilation, max=k - 1)
    y = torch.relu(y + suffix[:, live])
    return y if residual is None else torch.relu(y + residual)


# The conv cases' inputs lie on dyadic grids: activations multiples of 2**-4, weights of 2**-8, so every product
# is a multiple of 2**-12 and every sum of them is exact in float32 (far fewer than 2**24 grid steps), whatever
# order a variant sums in. The bias adds an odd multiple of 2**-13 and the residual one of 2**-14, so neither
# the pre-activation z nor relu(z) + residual is ever 0. Every variant then sees the same ReLU signs. With
# unrounded random inputs, a z within rounding of 0 (at b=256 about one in a million) took one sign in one
# variant and the other in another, and the same-result check failed on a correct kernel: 376 gradient elements
# of the PyTorch context-table variant, from one flipped ReLU, on an AMD EPYC machine.
ACTIVATION_GRID, WEIGHT_GRID, BIAS_ODD, RESIDUAL_ODD = 2.0 ** -4, 2.0 ** -8, 2.0 ** -13, 2.0 ** -14


def on_grid(shape, scale, grid, odd, device):
    """Normal values times ``scale``, rounded to multiples of ``grid``, plus or minus ``odd`` when given."""
    values = torch.round(torch.randn(*shape, device=device) * (scale / grid)) * grid
    if odd:
        values = values + odd * (torch.randint(0, 2, shape, device=device) * 2 - 1)
    return values


def _conv_case(device, dtype, label, batch, time, channels, k, dilation, *, groups=1, context_channels=0,
               residual=True, backward=False, frozen=()):
    """frozen: names of the tensors that want no gradient ("x": a first layer over data, not embeddings;
    "weight", "bias": a frozen layer); every variant's backward then skips their gradients alike."""
    in_per_group = channels // groups
    element = torch.finfo(dtype).bits // 8
    macs = batch * time * channels * (in_per_group + context_channels) * k
    activations = batch * time * channels * (3 if residual else 2) + batch * context_channels
    weights = channels * (in_per_group + context_channels) * k
    passes = 1 + (backward and "x" not in frozen) + (backward and "weight" not in frozen)  # the products run
    name = (f"{label} b={batch} t={time} c={channels} k={k} d={dilation}" + (f" ctx={context_channels}"
            if context_channels else "") + (f" no grad for {'+'.join(frozen)}" if frozen else "")
            + (" fwd+bwd" if backward else " fwd"))

    def make(dtype=dtype):
        def tensor(*shape, scale=1.0, grid=ACTIVATION_GRID, odd=0.0, name=None):
            return on_grid(shape, scale, grid, odd, device).to(dtype).requires_grad_(backward and name not in frozen)

        x = tensor(batch, time, channels, name="x")
        weight = tensor(channels, in_per_group, k, scale=(in_per_group * k) ** -0.5, grid=WEIGHT_GRID, name="weight")
        bias = tensor(channels, grid=WEIGHT_GRID, odd=BIAS_ODD, name="bias")
        context = tensor(batch, context_channels) if context_channels else None
        context_weight = tensor(channels, context_channels, k, scale=(context_channels * k) ** -0.5,
                                grid=WEIGHT_GRID) if context_channels else None
        res = tensor(batch, time, channels, odd=RESIDUAL_ODD) if residual else None
        leaves = [t for t in (x, weight, bias, context, context_weight, res) if t is not None and t.requires_grad]
        grad_out = torch.randn(batch, time, channels, device=device, dtype=dtype)

        def fast():
            return causal_conv1d(x, weight, bias, dilation=dilation, groups=groups, context=context,
                                 context_weight=context_weight, activation="relu", residual=res)

        def eager():
            return torch_way(x, weight, bias, dilation, groups, context, context_weight, res)

        compiled_fn = torch.compile(torch_way)

        def compiled():
            return compiled_fn(x, weight, bias, dilation, groups, context, context_weight, res)

        def run(fn):
            if not backward:
                return fn

            def forward_backward():  # the output too, so that the same-result check compares it as well
                out = fn()
                return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))
            return forward_backward

        made = {"hiertcn_fast": run(fast), "torch eager": run(eager), "torch.compile": run(compiled)}
        if context_channels:
            made[CONTEXT_TABLE] = run(lambda: torch_way_context_table(x, weight, bias, dilation, groups, context,
                                                                      context_weight, res))
        if routes:
            for name, mode in CPU_ROUTES.items():
                made[name] = _forced_route(mode, run(fast))
        return made

    # The cpu backend's two routes for a dense convolution, each forced (hiertcn_fast itself runs the one that
    # ops.cpu_conv_blas() reports): the measurement behind its "auto" rule, taken on whatever CPU runs this.
    routes = device == "cpu" and dtype == torch.float32 and groups == 1 and _extension.loaded()
    variants = (("hiertcn_fast", "torch eager", "torch.compile") + ((CONTEXT_TABLE,) if context_channels else ())
                + (tuple(CPU_ROUTES) if routes else ()))
    # In a half type the grid's values round (the bias's and residual's odd offsets do not survive bfloat16), the
    # variants' different summation orders tip a ReLU, and a flipped ReLU moves a whole gradient element: the
    # same-result check runs on the float32 inputs the half ones were rounded from.
    check_make = (lambda: make(torch.float32)) if dtype in (torch.float16, torch.bfloat16) else None
    return harness.Case("causal_conv1d", name, make, flops=2 * macs * passes,
                        bytes=(activations + weights) * element * passes, dtype=dtype, variants=variants,
                        check_make=check_make)


CPU_ROUTES = {"hiertcn_fast, BLAS route": "always", "hiertcn_fast, micro-kernels": "never"}


def _forced_route(mode, fn):
    """fn with the cpu conv's route forced to mode around each call (two atomic stores, next to a call of 100 us
    and more), the process's setting restored after it."""
    def forced():
        previous = set_cpu_conv_blas(mode)
        try:
            return fn()
        finally:
            set_cpu_conv_blas(previous)
    return forced


# Extra baselines, beside the "torch eager" (which for the conv concatenates the context, and for the
# step recomputes the window): what a PyTorch user can also write, so the speed-up over it is on record too.
CONTEXT_TABLE = "torch eager, context table"
STREAMING_STEP = "torch eager, streaming step"


class _TorchStreamingStep:
    """A TCN stack of residual blocks stepped in plain PyTorch: per layer a circular history of its last
    (k - 1) * dilation inputs, the k taps gathered and multiplied in one F.linear, relu, residual, relu; then the
    input written into the history. The same O(k) work per event as TCN.step, without fused kernels."""

    def __init__(self, layers, batch, channels, device, dtype):
        self.layers = []
        for weight, bias, dilation in layers:
            k = weight.shape[2]
            length = (k - 1) * dilation
            flat = weight.permute(0, 2, 1).reshape(weight.shape[0], -1)  # (out, k * in), taps oldest first
            history = torch.zeros(batch, max(length, 1), channels, device=device, dtype=dtype)
            self.layers.append((flat, bias, dilation, k, length, history))
        self.position = 0

    def __call__(self, x_t):
        pos = self.position
        h = x_t
        for flat, bias, dilation, k, length, history in self.layers:
            taps = [history[:, (pos - (k - 1 - j) * dilation) % length] if (k - 1 - j) * dilation <= pos
                    else torch.zeros_like(h) for j in range(k - 1)] + [h]
            out = torch.relu(torch.relu(F.linear(torch.cat(taps, dim=1), flat, bias)) + h)
            if length:
                history[:, pos % length] = h
            h = out
        self.position = pos + 1
        return h


def _step_case(device, dtype, batch, channels, k, dilations):
    """TCN.step for one event against recomputing the stack's newest output from the last window of inputs."""
    window = 1 + (k - 1) * sum(dilations)  # the stack's receptive field
    element = torch.finfo(dtype).bits // 8
    macs = batch * channels * channels * k * len(dilations)
    name = f"tcn step b={batch} c={channels} k={k} layers={len(dilations)} window={window}"

    def make():
        # Built here, after the harness seeds the case: its weights do not depend on which cases were collected.
        tcn = TCN(channels, [channels] * len(dilations), k, dilations, device=device, dtype=dtype).eval()
        assert tcn.receptive_field == window, (tcn.receptive_field, window)
        inputs = torch.randn(batch, window, channels, device=device, dtype=dtype)
        state = tcn.init_state(batch)
        with torch.no_grad():
            for t in range(window - 1):  # a full history, so every tap is live
                tcn.step(inputs[:, t], state)
        x_t = inputs[:, -1]
        layers = [(block.conv.weight.detach(), block.conv.bias.detach(), block.conv.dilation) for block in tcn.blocks]

        def recompute(window_inputs):
            h = window_inputs
            for weight, bias, dilation in layers:
                h = torch_way(h, weight, bias, dilation, 1, None, None, h)
            return h[:, -1]

        compiled_fn = torch.compile(recompute)

        def step():
            with torch.no_grad():
                return tcn.step(x_t, state)

        streaming = _TorchStreamingStep(layers, batch, channels, device, dtype)
        with torch.no_grad():
            for t in range(window - 1):
                streaming(inputs[:, t])

        def streaming_step():
            with torch.no_grad():
                return streaming(x_t)

        return {"hiertcn_fast": step, "torch eager": lambda: recompute(inputs),
                "torch.compile": lambda: compiled_fn(inputs), STREAMING_STEP: streaming_step}

    return harness.Case("tcn_step", name, make, flops=2 * macs,
                        bytes=(batch * channels * (k + 1) + channels * channels * k) * len(dilations) * element,
                        dtype=dtype, variants=("hiertcn_fast", "torch eager", "torch.compile", STREAMING_STEP))


def cases(device, quick):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hiertcn_batches = [32, 256] if quick else [32, 256, 1024]
    out = []
    for backward in (False, True):
        for batch in hiertcn_batches:
            # HierTCN's first block (user state as context) and a plain dense block.
            out.append(_conv_case(device, dtype, "hiertcn block1", batch, 21, 128, 5, 1, context_channels=256,
                                  backward=backward))
            out.append(_conv_case(device, dtype, "hiertcn dense", batch, 21, 128, 5, 2, backward=backward))
        # One session alone (a user's own model, fine-tuning on one stream): a whole session (the cpu backend's
        # BLAS route) and its first three events (below the route's size: the micro-kernels, forward and backward).
        for time in (21, 3):
            out.append(_conv_case(device, dtype, "small dense", 1, time, 128, 5, 2, backward=backward))
        if backward:
            # A dense layer over data (x wants no gradient) and a frozen one (nor the weight and bias): the backward
            # skips the input-gradient conv or the weight-gradient products.
            for frozen in (("x",), ("weight", "bias")):
                out.append(_conv_case(device, dtype, "dense", hiertcn_batches[-1], 21, 128, 5, 2, backward=True,
                                      frozen=frozen))
        if quick:
            out.append(_conv_case(device, dtype, "long dense", 4, 1024, 64, 5, 64, backward=backward))
            out.append(_conv_case(device, dtype, "long depthwise", 4, 2048, 128, 4, 512, groups=128,
                                  backward=backward))
        else:
            for time, dilation in ((500, 16), (4096, 512)):
                out.append(_conv_case(device, dtype, "long dense", 16, time, 128, 5, dilation, backward=backward))
                out.append(_conv_case(device, dtype, "long depthwise", 16, time, 512, 4, dilation, groups=512,
                                      backward=backward))
    for batch in ([1, 32] if quick else [1, 32, 1024]):
        out.append(_step_case(device, dtype, batch, 128, 5, (1, 2, 2)))  # window 21: HierTCN's session length
        out.append(_step_case(device, dtype, batch, 128, 5, tuple(2 ** i for i in range(7))))  # window 509
    return out


test_bench = harness.bench_test(cases)
