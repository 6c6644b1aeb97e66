"""linear_cross_entropy (the full-softmax training loss of every model here) against PyTorch's way,
F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum"), eager and torch.compile, forward
and forward+backward (gradients of features, weight and bias), with each variant's peak memory in the same
run (the "peak MiB" column: PyTorch's way keeps the (events, items) log-softmax for its backward; ours keeps
gradients of the features' and weight's sizes and one block of logits while it runs).

Shapes: a HierTCN training step's events (2,000 and 6,000) at width 128 over ml-100k's catalogue (1,683 ids)
and over XING's (20,777 items, the paper's data set). The loss has a fused path on the CPU only (on CUDA
tensors auto runs PyTorch's way), so there are no GPU cases.

    python -m pytest benchmarks/bench_loss.py -q -p no:cacheprovider
"""

import torch
import torch.nn.functional as F

import harness
from hiertcn_fast.ops import linear_cross_entropy


def _torch_way(features, weight, bias, targets):
    return F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum")


def _maker(events, dim, classes, backward):
    def make():
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(events, dim, generator=generator).requires_grad_(backward)
        weight = (torch.randn(classes, dim, generator=generator) * dim ** -0.5).requires_grad_(backward)
        bias = (torch.randn(classes, generator=generator) * 0.1).requires_grad_(backward)
        targets = torch.randint(0, classes, (events,), generator=generator)
        leaves = [features, weight, bias]
        compiled = torch.compile(_torch_way)

        def run(fn):
            if not backward:
                return lambda: fn(features, weight, bias, targets)
            return lambda: torch.autograd.grad(fn(features, weight, bias, targets), leaves)

        # The call as users and the trainer make it (no backend asked for), which must reach the fused op: a
        # call of its autograd node is checked once here, so a fallback to PyTorch's way cannot pass for ours.
        probe = linear_cross_entropy(features.detach().requires_grad_(), weight.detach(), bias.detach(), targets)
        if "LinearCrossEntropy" not in probe.grad_fn.name():
            raise RuntimeError(f"linear_cross_entropy did not run its fused op here (grad_fn {probe.grad_fn.name()})")
        return {"hiertcn_fast": run(linear_cross_entropy),
                "torch eager": run(_torch_way), "torch.compile": run(compiled)}

    return make


def cases(device, quick):
    if device != "cpu":
        return []
    # 21 events: one session alone (fewer events than features: the path that keeps the logits' gradient).
    shapes = [(21, 128, 1683), (2000, 128, 1683), (2000, 128, 20777)] if quick else [
        (21, 128, 1683), (2000, 128, 1683), (6000, 128, 1683), (2000, 128, 20777), (6000, 128, 20777)]
    out = []
    for events, dim, classes in shapes:
        for backward in (False, True):
            products = 3 if backward else 1  # the logits; and the two gradient products
            out.append(harness.Case(
                "linear_cross_entropy", f"events={events} dim={dim} classes={classes} {'fwd+bwd' if backward else 'fwd'}",
                _maker(events, dim, classes, backward), flops=2 * events * dim * classes * products,
                bytes=(events * dim + classes * dim) * 4 * (2 if backward else 1), dtype=torch.float32))
    return out


test_bench = harness.bench_test(cases)
