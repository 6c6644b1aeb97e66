"""Compile every Triton kernel of hiertcn_fast for a Hopper GPU (sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1, what the other tests use here) runs a kernel's Python, not the compiler:
it cannot see what only compilation rejects. One example: an int argument equal to 1 is compiled as a
constexpr, which has no ``.to()``. So this script runs the real launchers (hiertcn_fast.triton.*) on CPU tensors
with torch.library.wrap_triton replaced by a recorder, takes each launch's arguments as Triton's JIT would
specialise them (pointer dtypes, ints equal to 1 as constexprs, constexpr parameters by value), and compiles
each distinct one down to a cubin with triton.compile, checking that it fits an sm_90 block's shared memory.
Nothing runs.

Run in a process WITHOUT TRITON_INTERPRET (tests/test_triton_compile.py does): ``python tests/triton_sm90_compile.py``.
Exit status 0 when every kernel compiled; otherwise the failures are printed.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # an H200
SHARED_MEMORY_LIMIT = 227 * 1024  # per block on sm_90 (with the opt-in Triton's launcher makes)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}

launches = []


def recording_wrap_triton(kernel):
    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kernel, args, kwargs))
            return launch
    return Launcher()


def specialised(kernel, args, kwargs):
    """(signature, constexprs) of a launch as the JIT would compile it."""
    names = [param.name for param in kernel.params]
    values = dict(zip(names, args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {param.name} = {value!r} has no Triton type here")
    return signature, constexprs


def record_launches():
    from hiertcn_fast.ops.conv import ACTIVATIONS, context_table, pack_weight
    from hiertcn_fast.triton import causal_conv, gru_gates, gru_session

    torch.library.wrap_triton = recording_wrap_triton
    relu, gelu = ACTIVATIONS["relu"], ACTIVATIONS["gelu"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def t(*shape, like=dtype):
            return torch.randn(*shape).to(like)

        # (batch, time, in, out, k, dilation, groups): HierTCN's block, a depthwise layer, every size 1, and a
        # weight gradient split into row chunks (3 x 401 rows).
        for batch, time, cin, cout, k, d, groups in ((4, 21, 16, 8, 5, 2, 1), (2, 9, 6, 6, 3, 1, 6),
                                                     (1, 1, 1, 1, 1, 1, 1), (3, 401, 6, 6, 3, 5, 1),
                                                     (3, 401, 6, 6, 3, 5, 6)):
            x, weight = t(batch, time, cin), t(cout, cin // groups, k)
            out, pre, residual = t(batch, time, cout), t(batch, time, cout), t(batch, time, cout)
            bits = torch.zeros(batch, time, cout, dtype=torch.uint8)  # relu's sign bits
            table = context_table(t(batch, 3), t(cout, 3, k)).contiguous() if groups == 1 else None
            for activation, kept in ((relu, bits), (gelu, pre)):
                causal_conv.causal_conv_forward(x, pack_weight(weight, groups), t(cout), table, residual, d, groups,
                                                activation, out, kept)
            causal_conv.causal_conv_forward(x, pack_weight(weight, groups), None, None, None, d, groups, 0, out, None)
            # relu from its bits (no residual read, its gradient written), gelu from z and the residual, none
            causal_conv.causal_conv_backward(t(batch, time, cout), x, weight, bits, None, d, groups, relu,
                                             t(batch, time, cout), t(batch, time, cin), t(cout, cin // groups, k),
                                             t(batch, time, cout))
            causal_conv.causal_conv_backward(t(batch, time, cout), x, weight, pre, residual, d, groups, gelu,
                                             t(batch, time, cout), t(batch, time, cin), t(cout, cin // groups, k),
                                             t(batch, time, cout))
            causal_conv.causal_conv_backward(t(batch, time, cout), x, weight, None, None, d, groups, 0,
                                             t(batch, time, cout), t(batch, time, cin), t(cout, cin // groups, k),
                                             None)
            history, position = t(batch, (k - 1) * d, cin), torch.zeros(batch, dtype=torch.int64)
            causal_conv.causal_conv_step(x[:, 0], pack_weight(weight, groups), t(cout),
                                         None if table is None else table, t(batch, cout), d, groups, relu, history,
                                         position, t(batch, cout))
        for batch, hidden in ((3, 7), (1, 1)):
            gi, gh, h = t(batch, 3 * hidden), t(batch, 3 * hidden), t(batch, hidden)
            gru_gates.gru_gates_forward(gi, gh, h, t(batch, hidden))
            gru_gates.gru_gates_backward(t(batch, hidden), gi, gh, h, t(batch, 3 * hidden), t(batch, 3 * hidden),
                                         t(batch, hidden, like=torch.float32))
        for batch, time, dim in ((3, 5, 8), (1, 1, 1)):
            lengths = torch.ones(batch, dtype=torch.int64)
            gru_session.session_mean_forward(t(batch, time, dim), lengths, t(batch, dim))
            gru_session.session_mean_backward(t(batch, dim), lengths, t(batch, time, dim))


def main() -> int:
    record_launches()
    compiled, failures = set(), []
    for kernel, args, kwargs in launches:
        signature, constexprs = specialised(kernel, args, kwargs)
        key = (kernel.fn.__name__, tuple(signature.items()),
               tuple(sorted((index[0], repr(value)) for index, value in constexprs.items())))
        if key in compiled:
            continue
        compiled.add(key)
        try:
            binary = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET)
            if binary.metadata.shared > SHARED_MEMORY_LIMIT:
                failures.append(f"{kernel.fn.__name__} {signature} {constexprs}: needs {binary.metadata.shared} "
                                f"bytes of shared memory, more than an sm_90 block has ({SHARED_MEMORY_LIMIT})")
        except Exception as error:  # every failure is reported, then the exit status says so
            failures.append(f"{kernel.fn.__name__} {signature} {constexprs}:\n    {type(error).__name__}: "
                            f"{str(error)[:2000]}")
    names = sorted({key[0] for key in compiled})
    print(f"{len(compiled)} distinct launches of {len(names)} kernels compiled for sm_90: {', '.join(names)}")
    # Every kernel of the package must be among them: one added without a launch above is reported.
    from hiertcn_fast.triton import causal_conv, gru_gates, gru_session
    kernels = {name for module in (causal_conv, gru_gates, gru_session) for name, value in vars(module).items()
               if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    for name in sorted(kernels - set(names)):
        failures.append(f"{name}: never launched here; add a launch of it to record_launches()")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
