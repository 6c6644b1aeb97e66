"""gru_gates: every backend against the reference and against torch.nn.GRUCell (an independent peer)."""

import pytest
import torch

import hiertcn_fast
from hiertcn_fast.ops import gru_gates, gru_gates_reference
from helpers import BACKEND_DEVICES, CUDA, COMPARE_DTYPE, assert_close, rand

SHAPES = [(1, 1), (3, 7), (64, 128), (5, 200)]


def make_inputs(batch, hidden, dtype, device, noncontiguous=False):
    return (rand(batch, 3 * hidden, dtype=dtype, device=device, noncontiguous=noncontiguous),
            rand(batch, 3 * hidden, dtype=dtype, device=device, noncontiguous=noncontiguous),
            rand(batch, hidden, dtype=dtype, device=device, noncontiguous=noncontiguous))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("batch,hidden", SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_forward_and_gradients_match_reference(backend, device, batch, hidden, noncontiguous):
    dtype = COMPARE_DTYPE[backend]
    inputs = make_inputs(batch, hidden, dtype, device, noncontiguous)
    assert_matches_reference(lambda a, b, c: gru_gates(a, b, c, backend=backend), inputs, dtype)


def strided_leaf(t):
    """t's values with t's strides (a fresh copy of a non-contiguous t's wider buffer, viewed alike), keeping their
    gradient (.grad)."""
    if t.is_contiguous():
        return t.detach().clone().requires_grad_()
    base = t._base.detach().clone().requires_grad_()
    view = base.as_strided(t.size(), t.stride(), t.storage_offset())
    view.retain_grad()
    return view


def assert_matches_reference(gates, inputs, dtype):
    """gates(gi, gh, h) gives the float64 reference's output and its gradients for gi, gh and h."""
    leaves = [strided_leaf(t) for t in inputs]
    assert [t.stride() for t in leaves] == [t.stride() for t in inputs]
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in inputs]
    out = gates(*leaves)
    ref = gru_gates_reference(*ref_leaves)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    grad = rand(*out.shape, dtype=dtype, device=out.device)
    out.backward(grad)
    ref.backward(grad.double())
    for mine, theirs in zip(leaves, ref_leaves):
        assert_close(mine.grad, theirs.grad, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_matches_torch_gru_cell(backend, device):
    dtype = COMPARE_DTYPE[backend]
    cell = torch.nn.GRUCell(6, 11).to(device=device, dtype=dtype)
    x, h = rand(4, 6, dtype=dtype, device=device), rand(4, 11, dtype=dtype, device=device)
    gi = x @ cell.weight_ih.T + cell.bias_ih
    gh = h @ cell.weight_hh.T + cell.bias_hh
    assert_close(gru_gates(gi, gh, h, backend=backend), cell(x, h).detach(), dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    inputs = [t.requires_grad_() for t in make_inputs(3, 5, torch.float64, "cpu")]
    assert torch.autograd.gradcheck(lambda a, b, c: gru_gates(a, b, c, backend=backend), inputs)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "reference"])
def test_backward_is_deterministic(backend, device):
    inputs = make_inputs(33, 40, COMPARE_DTYPE[backend], device)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        gru_gates(*leaves, backend=backend).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_on_gpu(backend, dtype):
    inputs = make_inputs(17, 96, dtype, "cuda")
    out = gru_gates(*inputs, backend=backend)
    assert out.dtype == dtype
    assert_close(out, gru_gates_reference(*[t.double() for t in inputs]), dtype)


def test_opcheck_compiled_op():
    gi, gh, h = make_inputs(4, 9, torch.float64, "cpu")
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_out.default, (gi, gh, h), {"out": torch.empty_like(h)})
    grads = dict(grad_gi=torch.empty_like(gi), grad_gh=torch.empty_like(gh), grad_h=torch.empty_like(h))
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_backward_out.default, (torch.randn_like(h), gi, gh, h),
                          grads)


@pytest.mark.gpu
def test_opcheck_compiled_and_triton_ops_on_gpu():
    gi, gh, h = make_inputs(4, 9, torch.float32, "cuda")
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_out.default, (gi, gh, h), {"out": torch.empty_like(h)})
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_triton_out.default, (gi, gh, h, torch.empty_like(h)))


def test_triton_op_schema_check():
    # Fake-tensor and compile checks of a triton_op need a GPU (the interpreter reads data pointers,
    # which fake tensors lack): they run in test_opcheck_compiled_and_triton_ops_on_gpu.
    device = "cuda" if CUDA else "cpu"
    gi, gh, h = make_inputs(2, 5, torch.float32, device)
    torch.library.opcheck(torch.ops.hiertcn_fast.gru_gates_triton_out.default, (gi, gh, h, torch.empty_like(h)),
                          test_utils=("test_schema",))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    dtype = torch.float32
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: gru_gates(a, b, c, backend=backend), fullgraph=True)
    assert_matches_reference(compiled, make_inputs(6, 10, dtype, device), dtype)


def test_bad_input_is_a_clear_error():
    gi, gh, h = make_inputs(2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"gi \(batch, 3 \* hidden\) must have shape \(2, 12\)"):
        gru_gates(gi[:, :8], gh, h)
    with pytest.raises(ValueError, match="h must be 2-D"):
        gru_gates(gi, gh, h[0])
    with pytest.raises(TypeError, match="gh has dtype torch.float64 but h has torch.float32"):
        gru_gates(gi, gh.double(), h)
    with pytest.raises(TypeError, match="must have a floating dtype"):
        gru_gates(gi, gh, h.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        gru_gates(gi, gh, h.tolist())
    with pytest.raises(ValueError, match="backend must be one of"):
        gru_gates(gi, gh, h, backend="fast")


def test_compiled_op_checks_arguments_itself():
    gi, gh, h = make_inputs(2, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.hiertcn_fast.gru_gates_out(gi, gh, h, out=torch.empty(3, 4))
    with pytest.raises(RuntimeError, match="must have the dtype of h"):
        torch.ops.hiertcn_fast.gru_gates_out(gi.double(), gh, h, out=torch.empty_like(h))


def test_explicit_backend_never_falls_back():
    gi, gh, h = make_inputs(2, 4, torch.float16, "cpu")
    with pytest.raises(hiertcn_fast.BackendUnavailableError, match="does not support torch.float16"):
        gru_gates(gi, gh, h, backend="cpu")
    if not CUDA:
        with pytest.raises(hiertcn_fast.BackendUnavailableError, match="cuda"):
            gru_gates(gi.float(), gh.float(), h.float(), backend="cuda")
    # auto picks a backend that supports the dtype: the reference, for float16 on the CPU.
    assert_close(gru_gates(gi, gh, h), gru_gates_reference(gi.double(), gh.double(), h.double()), torch.float16)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_the_new_gate_is_accurate_relative_to_small_preactivations(backend, device):
    """n = tanh(gi_n + r * gh_n) near 0 is its argument to float32 rounding. 1 - 2 / (e^2x + 1), which the cpu and
    triton kernels had in float32, cancels there to an absolute error of a float ulp of 1: with z ~ 0 and h = 0 (so
    h' = n) tanh(1e-5) came out 1.0013580e-5, tanh(1e-30) 0."""
    v = torch.tensor([1e-3, -1e-4, 1e-5, -1e-7, 1e-30, 0.3, -0.39, 0.41, -0.6, 2.0, -9.0, 30.0], device=device)
    hidden = v.numel()
    gi = torch.cat([torch.zeros(hidden), torch.full((hidden,), -30.0), torch.zeros(hidden)]).to(device)[None]
    gi[0, 2 * hidden:] = v
    gh, h = torch.zeros_like(gi), torch.zeros(1, hidden, device=device)
    out = gru_gates(gi, gh, h, backend=backend)  # float32: the precision whose host math is our own
    expected = gru_gates_reference(gi.double(), gh.double(), h.double())
    torch.testing.assert_close(out.double(), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0.0)
