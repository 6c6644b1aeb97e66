"""Routes the compiled ops that have CUDA kernels to their emulated build, for whole test modules.

With HIERTCN_EMULATE_CUDA=1, tests/conftest.py puts an EmulatedOps in place of torch.ops.hiertcn_fast: the
cpu backend's calls of the ops below then run csrc/cuda's kernels (and the GRU drivers' CUDA branches) on
CPU tensors, and every other op (the triton ones, the CPU-only helpers) runs as before.
"""

import torch

# The ops with CUDA kernels (csrc/cuda/*.cu, and the GRU drivers registered for CUDA).
EMULATED = frozenset({
    "causal_conv1d_out", "causal_conv1d_backward_out", "causal_conv1d_step_out", "tcn_step_out",
    "gru_gates_out", "gru_gates_backward_out", "gru_layer_forward_out", "gru_layer_backward_out", "gru_cell",
    "session_update_forward_out", "session_update_backward_out", "session_update_steps_forward_out",
    "session_update_steps_backward_out", "session_update",
})


class EmulatedOps:
    def __init__(self, real, emulated):
        self._real, self._emulated = real, emulated

    def __getattr__(self, name):
        op = getattr(self._emulated if name in EMULATED else self._real, name)
        if name in EMULATED:
            return _Checked(op, self._emulated)
        return op


class _Checked:
    """An emulated op, run so as to catch what a GPU would do differently:
    - an op that writes into its arguments (the *_out ops) runs twice, its threads and blocks in ascending and
      then in descending order, from the same inputs; every argument must come out bitwise the same both
      times (a race between the threads of a barrier interval, or between blocks, shows as a difference);
    - an op that returns its results (gru_cell, session_update) runs in both orders too, and its results must
      be bitwise the same (their backward, a C++ autograd node, runs in ascending order only: the backward
      kernels are run in both orders by tests/test_cuda_emulated.py);
    - a launch error that no launch check raised fails the call.
    Its overloads (op.default) are checked alike."""

    def __init__(self, op, emulated):
        self._op, self._emulated = op, emulated
        self._name = op.__name__.split(".")[0].split("::")[-1]

    def __call__(self, *args, **kwargs):
        if not self._name.endswith("_out"):
            first = self._checked_call(args, kwargs)
            self._emulated.emu_set_reverse(True)
            try:
                second = self._checked_call(args, kwargs)
            finally:
                self._emulated.emu_set_reverse(False)
            firsts, seconds = _tensors(first), _tensors(second)
            if len(firsts) != len(seconds) or not all(_same_bits(a, b) for a, b in zip(firsts, seconds)):
                raise AssertionError(f"CUDA emulator: {self._name}'s results differ between ascending and descending "
                                     "thread and block order: a race")
            return second
        # The ascending run on copies (strides kept), the descending one on the caller's tensors: one call of
        # the op on those, as without the emulator (autograd counts their in-place writes).
        copies = {}
        self._checked_call(_copied(args, copies), _copied(kwargs, copies))
        self._emulated.emu_set_reverse(True)
        try:
            self._checked_call(args, kwargs)
        finally:
            self._emulated.emu_set_reverse(False)
        for i, (t, c) in enumerate(copies.values()):
            if not _same_bits(t, c):
                raise AssertionError(f"CUDA emulator: {self._name}'s tensor argument {i} {tuple(t.shape)} "
                                     "differs between ascending and descending thread and block order: a race")

    def _checked_call(self, args, kwargs):
        result = self._op(*args, **kwargs)
        error = self._emulated.emu_take_pending_error()
        if error:
            raise RuntimeError(f"CUDA emulator: unchecked launch error: {error}")
        return result

    def __getattr__(self, name):
        attr = getattr(self._op, name)
        if isinstance(attr, torch._ops.OpOverload):
            return _Checked(attr, self._emulated)
        return attr


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


_PAGE = 4096


def _copied(value, copies):
    """value with every tensor in it replaced by a copy of its storage viewed alike (recorded in copies: id ->
    (tensor, copy)), but for tensors whose elements overlap (expanded), which no op writes."""
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            if value.numel() > 1 and 0 in value.stride():
                return value
            # The whole storage, at the same offset and the same address modulo a page: BLAS sums in an order that
            # depends on the alignment of its operands.
            storage = value.untyped_storage()
            source = torch.empty(0, dtype=torch.uint8, device=value.device).set_(storage)
            room = torch.empty(storage.nbytes() + _PAGE, dtype=torch.uint8, device=value.device)
            shift = (storage.data_ptr() - room.data_ptr()) % _PAGE
            room[shift:shift + storage.nbytes()].copy_(source)
            copy = torch.empty(0, dtype=value.dtype, device=value.device).set_(
                room.untyped_storage(), shift // value.element_size() + value.storage_offset(), value.size(),
                value.stride())
            copies[id(value)] = (value, copy)
        return copies[id(value)][1]
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v, copies) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v, copies) for k, v in value.items()}
    return value


def _unit_stride_copy(t):
    # (contiguous() and clone() keep a one-element tensor's stride, which view(torch.uint8) refuses unless it is 1)
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))


def _same_bits(a, b):
    return torch.equal(_unit_stride_copy(a).view(torch.uint8), _unit_stride_copy(b).view(torch.uint8))


def install():
    """Puts the emulated ops in place for the rest of the process. The cpu backend's stack step is also made to
    run as it does on CUDA: every step through tcn_step_out (the CPU's prepared plan calls its kernel directly)
    with the plain (k, in, out) weight packing the CUDA kernel takes (the CPU's is column-blocked)."""
    from cuda_emu import build
    from hiertcn_fast.ops import conv

    emulated = build.load()
    torch.ops.hiertcn_fast = EmulatedOps(torch.ops.hiertcn_fast, emulated)
    conv._stack_weight_block = lambda out_channels, threads: out_channels
    conv._prepared_step = lambda *args, **kwargs: None
    return emulated
