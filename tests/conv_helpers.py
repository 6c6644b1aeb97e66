"""Helpers for the causal convolution tests: an independent F.conv1d peer and random problem inputs."""

import dataclasses

import torch
import torch.nn.functional as F

from helpers import rand

ACTIVATION_FUNCTIONS = {None: lambda v: v, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}


def left_padded_conv1d(x, weight, bias=None, dilation=1, groups=1):
    """torch's own conv1d on x (batch, time, in) left-padded by (k - 1) * dilation: (batch, time, out)."""
    k = weight.shape[2]
    padded = F.pad(x.transpose(1, 2), ((k - 1) * dilation, 0))
    return F.conv1d(padded, weight, bias, dilation=dilation, groups=groups).transpose(1, 2)


def conv1d_peer(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None, activation=None,
                residual=None):
    """causal_conv1d built from F.conv1d: the context is materialised at every step and convolved (densely)
    with the same zero padding, the epilogue applied in plain PyTorch."""
    z = left_padded_conv1d(x, weight, bias, dilation, groups)
    if context is not None:
        tiled = context[:, None, :].expand(-1, x.shape[1], -1)
        z = z + left_padded_conv1d(tiled, context_weight, None, dilation, 1)
    act = ACTIVATION_FUNCTIONS[activation]
    out = act(z)
    return out if residual is None else act(out + residual)


@dataclasses.dataclass
class ConvCase:
    """One causal_conv1d problem: shapes and which optional parts it uses."""

    batch: int
    time: int
    in_channels: int
    out_channels: int
    kernel_size: int
    dilation: int
    groups: int = 1
    context_channels: int = 0
    activation: str = None
    residual: bool = False
    bias: bool = True

    def __str__(self):
        parts = [f"b{self.batch}t{self.time}c{self.in_channels}o{self.out_channels}k{self.kernel_size}"
                 f"d{self.dilation}g{self.groups}"]
        if self.context_channels:
            parts.append(f"ctx{self.context_channels}")
        if self.activation:
            parts.append(self.activation)
        if self.residual:
            parts.append("res")
        if not self.bias:
            parts.append("nobias")
        return "-".join(parts)

    def inputs(self, dtype, device, noncontiguous=False):
        """The keyword arguments of causal_conv1d (x and weight included), fresh random values."""
        args = dict(
            x=rand(self.batch, self.time, self.in_channels, dtype=dtype, device=device, noncontiguous=noncontiguous),
            weight=rand(self.out_channels, self.in_channels // self.groups, self.kernel_size, dtype=dtype,
                        device=device, scale=(self.in_channels // self.groups * self.kernel_size) ** -0.5),
            dilation=self.dilation, groups=self.groups, activation=self.activation)
        if self.bias:
            args["bias"] = rand(self.out_channels, dtype=dtype, device=device, noncontiguous=noncontiguous)
        if self.context_channels:
            args["context"] = rand(self.batch, self.context_channels, dtype=dtype, device=device)
            args["context_weight"] = rand(self.out_channels, self.context_channels, self.kernel_size, dtype=dtype,
                                          device=device, scale=(self.context_channels * self.kernel_size) ** -0.5)
        if self.residual:
            args["residual"] = rand(self.batch, self.time, self.out_channels, dtype=dtype, device=device,
                                    noncontiguous=noncontiguous)
        return args


TENSOR_ARGS = ("x", "weight", "bias", "context", "context_weight", "residual")


def split_leaves(args, dtype=None):
    """A copy of args whose tensors are fresh leaves requiring grad (cast to dtype when given, else keeping their
    strides, so non-contiguous inputs stay non-contiguous); also the leaves, by name."""
    out, leaves = dict(args), {}
    for name in TENSOR_ARGS:
        if name in args:
            t = args[name].detach()
            t = (t.to(dtype) if dtype is not None else t).detach().requires_grad_()
            out[name] = leaves[name] = t
    return out, leaves
