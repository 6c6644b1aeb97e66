"""Triton kernels and their launchers. Imported lazily by hiertcn_fast.ops, so that importing
hiertcn_fast never imports triton, and TRITON_INTERPRET can still be set before first use."""

import torch

from ..backends import triton_interpreted


def launcher(kernel):
    """What to index with the grid to launch ``kernel``: torch.library.wrap_triton(kernel), which torch.compile
    traces, or, in the Triton interpreter, the kernel itself. torch 2.11's wrap_triton refuses the interpreter's
    kernels (Triton 3.6 makes them another class), and an interpreted launch is never traced (torch.compile of the
    triton ops needs a GPU). wrap_triton is looked up at each call, so a test may replace it."""
    if triton_interpreted():
        return kernel
    return torch.library.wrap_triton(kernel)
