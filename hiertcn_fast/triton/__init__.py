"""Triton kernels and their launchers, imported by hiertcn_fast.ops at the first Triton op. (Importing hiertcn_fast
imports triton itself all the same: torch.library.triton_op looks for the kernels of the ops it registers. So
TRITON_INTERPRET must be set before hiertcn_fast is imported; the triton backend says so where it was set later.)"""

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


# CUDA's grid limits: 2**31 - 1 blocks on axis 0, 65535 on axes 1 and 2.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def checked_grid(grid: tuple, kernel: str) -> tuple:
    """``grid``, or a ValueError naming the kernel and the axis where it passes CUDA's limits (a launch past them
    fails with the driver's 'invalid argument'). Sizes that are not plain ints (traced) are left to the launch."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if isinstance(size, int) and size > limit:
            raise ValueError(f"{kernel}: the launch needs {size} blocks on grid axis {axis}, past CUDA's limit of "
                             f"{limit}; split the call into smaller batches")
    return grid
