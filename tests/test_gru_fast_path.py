"""The eager shortcut of gru_cell, nn.GRUCell, nn.GRU.step and session_update: a call that asks for no backend anywhere, on tensors a
compiled kernel takes, goes straight to the op, which checks its arguments itself; the Python checks and the backend
selection run only where the op refuses the call or the shortcut does not apply. Whichever way a call goes, its
results (to the bit), gradients and errors must be those of the fully checked path."""

import sys

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.nn.utils import parametrizations

import hiertcn_fast.backends  # noqa: F401 (the module, below)
from hiertcn_fast.backends import ENV_VAR, default_kernel, use_backend
from hiertcn_fast.nn import GRU, GRUCell
from hiertcn_fast.ops import gru_cell, session_update
from helpers import CUDA

gru_ops = sys.modules["hiertcn_fast.ops.gru"]
backends = sys.modules["hiertcn_fast.backends"]  # (hiertcn_fast.backends is also a function's name)
KERNEL = backends.backends()[2].available  # the cpu backend: the compiled extension is loaded
pytestmark = pytest.mark.skipif(not KERNEL, reason="the compiled extension is not loaded (no kernel to shortcut to)")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _device(device):
    if device == "cuda" and not (CUDA and backends.backends()[0].available):
        pytest.skip("no CUDA device with the cuda backend built")
    return torch.device(device)


@pytest.fixture
def full_path_calls(monkeypatch):
    """The calls that reached the fully checked entry point of gru_cell, of GRUCell.forward and of GRU.step."""
    calls = []

    def spy(where, original):
        def run(*args, **kwargs):
            calls.append(where)
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(gru_ops, "_gru_cell", spy("gru_cell", gru_ops._gru_cell))
    monkeypatch.setattr(gru_ops, "_session_update_checked", spy("session_update", gru_ops._session_update_checked))
    monkeypatch.setattr(GRUCell, "_forward_checked", spy("GRUCell", GRUCell._forward_checked))
    monkeypatch.setattr(GRU, "_step_checked", spy("GRU.step", GRU._step_checked))
    return calls


def _cell_args(batch, hidden, inputs, dtype, device, bias=True, noncontiguous=False):
    torch.manual_seed(batch * 100 + hidden)
    x = torch.randn(batch, inputs, dtype=dtype, device=device)
    h = torch.randn(batch, 2 * hidden if noncontiguous else hidden, dtype=dtype, device=device)
    if noncontiguous:
        h = h[:, ::2]
    weights = [torch.randn(3 * hidden, inputs, dtype=dtype, device=device) / inputs ** 0.5,
               torch.randn(3 * hidden, hidden, dtype=dtype, device=device) / hidden ** 0.5]
    if bias:
        weights += [torch.randn(3 * hidden, dtype=dtype, device=device) for _ in range(2)]
    else:
        weights += [None, None]
    return [x, h, *weights]


def _run_with_grads(fn, args):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    torch.manual_seed(7)
    out.backward(torch.randn_like(out))
    return out.detach(), [None if a is None else a.grad for a in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,hidden,inputs,bias,noncontiguous", [
    (1, 7, 5, True, False), (3, 16, 16, False, False), (32, 128, 64, True, True), (0, 4, 3, True, False)])
def test_the_shortcut_gives_the_checked_path_bits(full_path_calls, device, dtype, batch, hidden, inputs, bias,
                                                  noncontiguous):
    args = _cell_args(batch, hidden, inputs, dtype, _device(device), bias, noncontiguous)
    out, grads = _run_with_grads(gru_cell, args)
    assert full_path_calls == [], "a well-formed default call took the checked path"
    # backend= names the same kernel but takes the checked path.
    out_checked, grads_checked = _run_with_grads(lambda *a: gru_cell(*a, backend=device), args)
    assert full_path_calls == ["gru_cell"]
    assert torch.equal(out, out_checked)
    for got, want in zip(grads, grads_checked):
        assert (got is None and want is None) or torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(gru_cell(*args), out)


def _selection_cases():
    """Calls that must take the checked path: a backend asked for (keyword, block, environment), a dtype the kernels
    lack, and the states under which the selection picks another backend or casts (forward AD, autocast)."""
    return ["keyword", "use_backend", "environment", "float16", "forward_ad", "autocast", "meta"]


@pytest.mark.parametrize("case", _selection_cases())
def test_the_shortcut_is_not_taken_where_the_selection_decides(full_path_calls, monkeypatch, case):
    x, h, *weights = _cell_args(2, 4, 3, torch.float32, "cpu")
    expected_reference = gru_ops.gru_cell_reference(x, h, *weights)
    if case == "keyword":
        out = gru_cell(x, h, *weights, backend="reference")
    elif case == "use_backend":
        with use_backend("reference"):
            out = gru_cell(x, h, *weights)
    elif case == "environment":
        monkeypatch.setenv(ENV_VAR, "reference")
        out = gru_cell(x, h, *weights)
    elif case == "float16":  # the cpu kernels take float32 and float64: auto runs the reference
        x, h, *weights = (t.half() for t in (x, h, *weights))
        expected_reference = gru_ops.gru_cell_reference(x, h, *weights)
        out = gru_cell(x, h, *weights)
    elif case == "forward_ad":  # the kernels have no jvp: auto runs the reference, which carries the tangent
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.ones_like(x))
            out = forward_ad.unpack_dual(gru_cell(dual, h, *weights)).primal
    elif case == "autocast":  # cast to the input dtype around the op (in_input_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gru_cell(x, h, *weights)
        assert out.dtype == torch.float32
    else:  # meta tensors: no kernel; the reference composition gives the shape
        x, h, *weights = (t.to("meta") for t in (x, h, *weights))
        out = gru_cell(x, h, *weights)
        assert full_path_calls == ["gru_cell"] and out.device.type == "meta" and out.shape == (2, 4)
        return
    assert full_path_calls == ["gru_cell"], case
    torch.testing.assert_close(out, expected_reference, rtol=2e-3 if case == "float16" else 1e-6,
                               atol=2e-3 if case == "float16" else 1e-6)
    if case in ("environment", "keyword", "use_backend"):
        assert torch.equal(out, expected_reference), "another backend than the one asked for ran"


def test_the_environment_variable_is_read_at_every_call(monkeypatch):
    x, h, *weights = _cell_args(2, 4, 3, torch.float32, "cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_kernel("gru_cell", h, gru_ops.GRU_DTYPES)
    monkeypatch.setenv(ENV_VAR, "reference")
    assert not default_kernel("gru_cell", h, gru_ops.GRU_DTYPES)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert default_kernel("gru_cell", h, gru_ops.GRU_DTYPES)
    monkeypatch.setenv(ENV_VAR, "")
    assert default_kernel("gru_cell", h, gru_ops.GRU_DTYPES)
    monkeypatch.setenv(ENV_VAR, "nonsense")  # the checked path refuses it, as before
    with pytest.raises(ValueError, match=ENV_VAR):
        gru_cell(x, h, *weights)
    monkeypatch.delenv(ENV_VAR)
    assert default_kernel("gru_cell", h, gru_ops.GRU_DTYPES)


def _bad_cell_calls():
    x, h, w_ih, w_hh, b_ih, b_hh = _cell_args(3, 4, 5, torch.float32, "cpu")
    return {
        "x too narrow": (x[:, :4], h, w_ih, w_hh, b_ih, b_hh),
        "h of another batch": (x, h[:2], w_ih, w_hh, b_ih, b_hh),
        "x float64": (x.double(), h, w_ih, w_hh, b_ih, b_hh),
        "w_hh float64": (x, h, w_ih, w_hh.double(), b_ih, b_hh),
        "x 3-D": (x[:, None], h, w_ih, w_hh, b_ih, b_hh),
        "h 1-D": (x, h[0], w_ih, w_hh, b_ih, b_hh),
        "one bias": (x, h, w_ih, w_hh, b_ih, None),
        "bias too short": (x, h, w_ih, w_hh, b_ih[:-1], b_hh),
        "w_ih with 2 gates": (x, h, w_ih[:8], w_hh, b_ih, b_hh),
        "x a list": (x.tolist(), h, w_ih, w_hh, b_ih, b_hh),
        "w_ih a list": (x, h, w_ih.tolist(), w_hh, b_ih, b_hh),
        "x on meta": (x.to("meta"), h, w_ih, w_hh, b_ih, b_hh),
        "x int64": (x.long(), h, w_ih, w_hh, b_ih, b_hh),
    }


@pytest.mark.parametrize("case", list(_bad_cell_calls()))
def test_bad_input_gets_the_checked_paths_error(case):
    args = _bad_cell_calls()[case]
    with pytest.raises(Exception) as checked:
        gru_cell(*args, backend="cpu")
    with pytest.raises(Exception) as shortcut:
        gru_cell(*args)
    assert type(shortcut.value) is type(checked.value), (case, shortcut.value, checked.value)
    assert str(shortcut.value) == str(checked.value), case
    assert "hiertcn_fast" not in str(shortcut.value) or "gru_cell" in str(shortcut.value)


# ---- nn.GRUCell and nn.GRU.step ---------------------------------------------------------------------

def _twins(peer_class, our_class, backend, **kwargs):
    """A torch.nn module, our drop-in with its weights (the shortcut), and another that names the backend (the
    same kernel through the checked path)."""
    torch.manual_seed(3)
    peer = peer_class(5, 6, **kwargs)
    module, checked = our_class(5, 6, **kwargs), our_class(5, 6, backend=backend, **kwargs)
    for m in (module, checked):
        m.load_state_dict(peer.state_dict())
    return peer, module, checked


def _cell_modules(bias=True, dtype=torch.float32, device="cpu"):
    return _twins(torch.nn.GRUCell, GRUCell, torch.device(device).type, bias=bias, dtype=dtype, device=device)


def _module_outputs_and_grads(module, x, hx):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else hx.detach().clone().requires_grad_()
    out = module(x, hx)
    torch.manual_seed(5)
    out.backward(torch.randn_like(out))
    return [out.detach(), x.grad, None if hx is None else hx.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_grucell_shortcut_equals_the_checked_path_and_torch(full_path_calls, device, dtype, bias, with_hx):
    device = _device(device)
    peer, module, checked = _cell_modules(bias, dtype, device)
    x = torch.randn(4, 5, dtype=dtype, device=device)
    hx = torch.randn(4, 6, dtype=dtype, device=device) if with_hx else None
    got = _module_outputs_and_grads(module, x, hx)
    assert full_path_calls == []
    want = _module_outputs_and_grads(checked, x, hx)
    assert full_path_calls == ["GRUCell", "gru_cell"]
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(got, _module_outputs_and_grads(peer, x, hx)):
        assert (a is None and b is None) or torch.allclose(a, b, **tolerance)


@pytest.mark.parametrize("how", ["parametrize", "hooked weight_norm", "replaced weight"])
def test_grucell_with_weights_computed_on_access(full_path_calls, how):
    """A parametrized weight (not in _parameters), the older hook-based weight_norm (a plain attribute set by a
    pre-hook) and a weight replaced by another Parameter: the shortcut reads what the attribute gives."""
    peer, module, _ = _cell_modules()
    replacement = peer.weight_hh.detach() * 0.5
    for m in (peer, module):
        if how == "parametrize":
            parametrizations.weight_norm(m, "weight_hh")
        elif how == "hooked weight_norm":
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(m, "weight_ih")
        else:
            m.weight_hh = torch.nn.Parameter(replacement.clone())
    x, hx = torch.randn(3, 5), torch.randn(3, 6)
    for a, b in zip(_module_outputs_and_grads(module, x, hx), _module_outputs_and_grads(peer, x, hx)):
        torch.testing.assert_close(a, b)
    assert full_path_calls == []


def _bad_module_calls():
    x, hx = torch.randn(3, 5), torch.randn(3, 6)
    return {
        "input too wide": (torch.randn(3, 7), hx),
        "hx of another batch": (x, hx[:2]),
        "hx too narrow": (x, hx[:, :5]),
        "hx 3-D": (x, hx[None]),
        "input float64": (x.double(), hx),
        "hx float64": (x, hx.double()),
        "input int64": (x.long(), hx),
        "hx on meta": (x, hx.to("meta")),
        "input a list": (x.tolist(), hx),
    }


@pytest.mark.parametrize("case", list(_bad_module_calls()))
def test_grucell_bad_input_gets_the_checked_paths_error(case):
    _, module, checked = _cell_modules()
    x, hx = _bad_module_calls()[case]
    with pytest.raises(Exception) as want:
        checked(x, hx)
    with pytest.raises(Exception) as got:
        module(x, hx)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value), (case, got.value)


def test_grucell_with_a_weight_of_another_width_is_refused_as_torch_refuses_it():
    """The module's input_size is compared, not the weight's width: a weight replaced by one of another shape
    (which the kernel alone would take, with an input of that width) is refused as by the checked path."""
    _, module, checked = _cell_modules()
    for m in (module, checked):
        m.weight_ih = torch.nn.Parameter(torch.randn(18, 7))
    x = torch.randn(3, 7)
    with pytest.raises(ValueError, match="input_size") as want:
        checked(x)
    with pytest.raises(ValueError, match="input_size") as got:
        module(x)
    assert str(got.value) == str(want.value)


def _gru_modules(num_layers, bias=True, dropout=0.0):
    return _twins(torch.nn.GRU, GRU, "cpu", num_layers=num_layers, bias=bias, batch_first=True, dropout=dropout)


def _step_outputs_and_grads(module, x, hx):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else hx.detach().clone().requires_grad_()
    out, h_n = module.step(x, hx)
    torch.manual_seed(6)
    (out * torch.randn_like(out)).sum().add((h_n * torch.randn_like(h_n)).sum()).backward()
    return [out.detach(), h_n.detach(), x.grad, None if hx is None else hx.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_gru_step_shortcut_equals_the_checked_path_and_torch(full_path_calls, num_layers, bias, with_hx):
    peer, module, checked = _gru_modules(num_layers, bias)
    x = torch.randn(4, 5)
    hx = torch.randn(num_layers, 4, 6) if with_hx else None
    got = _step_outputs_and_grads(module, x, hx)
    assert full_path_calls == []
    want = _step_outputs_and_grads(checked, x, hx)
    assert full_path_calls == ["GRU.step"]
    for i, (a, b) in enumerate(zip(got, want)):  # the same kernels, forward and backward: the same bits
        assert (a is None and b is None) or torch.equal(a, b), i
    peer.zero_grad(set_to_none=True)
    xp = x.clone().requires_grad_()
    hp = None if hx is None else hx.clone().requires_grad_()
    out, h_n = peer(xp[:, None], hp)
    torch.manual_seed(6)
    (out[:, 0] * torch.randn_like(out[:, 0])).sum().add((h_n * torch.randn_like(h_n)).sum()).backward()
    peer_results = [out[:, 0].detach(), h_n.detach(), xp.grad, None if hp is None else hp.grad]
    for a, b in zip(got, peer_results + [p.grad for p in peer.parameters()]):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gru_step_with_dropout_in_training_takes_the_checked_path(full_path_calls):
    _, module, _ = _gru_modules(2, dropout=0.5)
    module.step(torch.randn(2, 5))
    assert full_path_calls == ["GRU.step"]
    module.eval()  # no dropout in evaluation: the shortcut
    module.step(torch.randn(2, 5))
    assert full_path_calls == ["GRU.step"]


def _bad_step_calls():
    x, hx = torch.randn(3, 5), torch.randn(2, 3, 6)
    return {
        "input too wide": (torch.randn(3, 7), hx),
        "hx of another batch": (x, hx[:, :2]),
        "hx with another layer count": (x, hx[:1]),
        "hx too narrow": (x, hx[..., :5]),
        "hx 2-D": (x, hx[0]),
        "input 3-D": (x[:, None], hx),
        "input float64": (x.double(), hx),
        "hx float64": (x, hx.double()),
        "hx on meta": (x, hx.to("meta")),
    }


@pytest.mark.parametrize("case", list(_bad_step_calls()))
def test_gru_step_bad_input_gets_the_checked_paths_error(case):
    _, module, checked = _gru_modules(2)
    x, hx = _bad_step_calls()[case]
    with pytest.raises(Exception) as want:
        checked.step(x, hx)
    with pytest.raises(Exception) as got:
        module.step(x, hx)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value), (case, got.value)


def test_default_kernel_is_false_wherever_the_selection_must_run(monkeypatch):
    h = torch.randn(2, 4)
    dtypes = gru_ops.GRU_DTYPES
    assert default_kernel("gru_cell", h, dtypes)
    assert not default_kernel("gru_cell", h.half(), dtypes)
    assert not default_kernel("gru_cell", h.to("meta"), dtypes)
    with use_backend("cpu"):  # asked for by name, even the kernel's own: the checked path
        assert not default_kernel("gru_cell", h, dtypes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not default_kernel("gru_cell", h, dtypes)
    with forward_ad.dual_level():
        assert not default_kernel("gru_cell", h, dtypes)
    with torch.no_grad(), torch.inference_mode():
        assert default_kernel("gru_cell", h, dtypes)

    def traced(h):
        return torch.tensor(1.0) if default_kernel("gru_cell", h, dtypes) else torch.tensor(0.0)

    torch._dynamo.reset()
    assert torch.compile(traced, backend="eager", fullgraph=True)(h).item() == 0.0
    seen = []
    torch.func.vmap(lambda row: seen.append(default_kernel("gru_cell", row, dtypes)) or row)(h)
    assert seen == [False]


def test_compiled_gru_cell_still_compiles_fullgraph_and_matches():
    args = _cell_args(3, 4, 5, torch.float32, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: gru_cell(*a), backend="eager", fullgraph=True)
    assert torch.equal(compiled(*args), gru_cell(*args))


# ---- session_update ---------------------------------------------------------------------------------

def _session_args(batch=3, time=5, dim=4, hidden=6, layers=2, bias=True, projected=None, dtype=torch.float32):
    torch.manual_seed(11)
    items = torch.randn(batch, time, dim, dtype=dtype)
    lengths = torch.randint(0, time + 1, (batch,))
    lengths[0] = 0  # a row without a session leaves h alone
    h = torch.randn(layers, batch, hidden, dtype=dtype)
    keep = (torch.rand(batch) > 0.3).to(dtype)
    inputs = projected or dim
    weights = []
    for layer in range(layers):
        tensors = [torch.randn(3 * hidden, inputs if layer == 0 else hidden, dtype=dtype) * 0.3,
                   torch.randn(3 * hidden, hidden, dtype=dtype) * 0.3]
        if bias:
            tensors += [torch.randn(3 * hidden, dtype=dtype) * 0.1 for _ in range(2)]
        weights.append(tensors)
    proj = {} if projected is None else {"proj_weight": torch.randn(projected, dim, dtype=dtype) * 0.3,
                                         "proj_bias": torch.randn(projected, dtype=dtype) * 0.1}
    return (items, lengths, h, keep, weights), proj


def _session_run(args, proj, **kwargs):
    items, lengths, h, keep, weights = args
    leaves = [items.clone().requires_grad_(), h.clone().requires_grad_(), keep.clone().requires_grad_()]
    layers = [[t.clone().requires_grad_() for t in layer] for layer in weights]
    proj = {k: v.clone().requires_grad_() for k, v in proj.items()}
    out = session_update(leaves[0], lengths, leaves[1], leaves[2], layers, **proj, **kwargs)
    torch.manual_seed(12)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in leaves] + [t.grad for layer in layers for t in layer] + \
        [v.grad for v in proj.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers,bias,projected", [(1, True, None), (2, False, None), (3, True, 5)])
def test_session_update_shortcut_gives_the_checked_path_bits(full_path_calls, dtype, layers, bias, projected):
    args, proj = _session_args(layers=layers, bias=bias, projected=projected, dtype=dtype)
    got = _session_run(args, proj)
    assert full_path_calls == []
    want = _session_run(args, proj, backend="cpu")
    assert full_path_calls == ["session_update"]
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("case", ["lengths int32", "keep bool", "h not contiguous", "weights tuples"])
def test_session_update_arguments_the_checked_path_converts(full_path_calls, case):
    """Arguments the op does not take as they are (the checked path converts them) go the checked way; a tuple
    of tuples is as good as a list of lists."""
    (items, lengths, h, keep, weights), _ = _session_args()
    want = session_update(items, lengths, h, keep, weights)
    assert full_path_calls == []
    if case == "lengths int32":
        lengths = lengths.int()
    elif case == "keep bool":
        keep = keep.bool()
    elif case == "h not contiguous":
        h = h.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        weights = tuple(tuple(layer) for layer in weights)
    assert torch.equal(session_update(items, lengths, h, keep, weights), want)
    assert full_path_calls == ([] if case == "weights tuples" else ["session_update"])


def _bad_session_calls():
    (items, lengths, h, keep, weights), _ = _session_args()
    w0, w1 = weights
    return {
        "lengths above time": (items, lengths + 6, h, keep, weights, {}),
        "negative length": (items, lengths - 6, h, keep, weights, {}),
        "lengths of another batch": (items, lengths[:2], h, keep, weights, {}),
        "keep of another batch": (items, lengths, h, keep[:2], weights, {}),
        "h of another batch": (items, lengths, h[:, :2].contiguous(), keep, weights, {}),
        "a layer without biases": (items, lengths, h, keep, [w0, w1[:2]], {}),
        "one layer too many": (items, lengths, h, keep, [w0, w1, w1], {}),
        "biases as a layer": (items, lengths, h, keep, [w0[:2], w0[2:]], {}),
        "w_ih of layer 1 too wide": (items, lengths, h, keep, [w0, [torch.randn(18, 7), *w1[1:]]], {}),
        "items float64": (items.double(), lengths, h, keep, weights, {}),
        "items 2-D": (items[:, 0], lengths, h, keep, weights, {}),
        "proj_bias alone": (items, lengths, h, keep, weights, {"proj_bias": torch.randn(4)}),
        "proj_weight of another width": (items, lengths, h, keep, weights, {"proj_weight": torch.randn(4, 3)}),
        "a weight on meta": (items, lengths, h, keep, [w0, [w1[0].to("meta"), *w1[1:]]], {}),
        "lengths a list": (items, lengths.tolist(), h, keep, weights, {}),
        "weights a tensor": (items, lengths, h, keep, torch.stack([torch.stack(w1[:2]), torch.stack(w1[:2])]), {}),
    }


@pytest.mark.parametrize("case", list(_bad_session_calls()))
def test_session_update_bad_input_gets_the_checked_paths_error(case):
    items, lengths, h, keep, weights, proj = _bad_session_calls()[case]
    with pytest.raises(Exception) as want:
        session_update(items, lengths, h, keep, weights, **proj, backend="cpu")
    with pytest.raises(Exception) as got:
        session_update(items, lengths, h, keep, weights, **proj)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value), (case, got.value)
