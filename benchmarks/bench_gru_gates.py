"""gru_gates (the fused GRU gate math) against the same math in eager PyTorch and torch.compile."""

import torch

import harness
from hiertcn_fast.ops import gru_gates, gru_gates_reference


def cases(device, quick):
    shapes = [(32, 128), (256, 128), (1024, 256)] if quick else [(1, 128), (32, 128), (256, 128), (256, 512),
                                                                  (1024, 256), (16384, 512)]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    out = []
    for batch, hidden in shapes:
        element = torch.finfo(dtype).bits // 8
        # Reads gi, gh (3 * hidden each) and h, writes h': 8 * hidden elements per row.
        bytes_moved = batch * 8 * hidden * element
        out.append(harness.Case("gru_gates", f"b={batch} h={hidden} fwd", _maker(batch, hidden, dtype, device, False),
                                bytes=bytes_moved, dtype=dtype))
        # Backward also reads grad_out and writes grad_gi, grad_gh, grad_h: 16 more elements per unit.
        out.append(harness.Case("gru_gates", f"b={batch} h={hidden} fwd+bwd", _maker(batch, hidden, dtype, device, True),
                                bytes=bytes_moved + batch * 16 * hidden * element, dtype=dtype))
    return out


def _maker(batch, hidden, dtype, device, backward):
    def make():
        leaves = [torch.randn(batch, n * hidden, device=device, dtype=dtype, requires_grad=backward)
                  for n in (3, 3, 1)]
        grad = torch.randn(batch, hidden, device=device, dtype=dtype)
        compiled = torch.compile(gru_gates_reference)

        def run(fn):
            if not backward:
                return lambda: fn(*leaves)
            return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)

        return {"hiertcn_fast": run(gru_gates), "torch eager": run(gru_gates_reference),
                "torch.compile": run(compiled)}

    return make


test_bench = harness.bench_test(cases)
