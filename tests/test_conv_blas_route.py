"""The cpu backend's two routes for big dense causal convolutions (torch's BLAS, or the package's micro-kernels) and
the setting that picks one (hiertcn_fast.ops.cpu_conv_blas / set_cpu_conv_blas): both routes against the reference,
forward and every gradient; the setting takes effect (the routes differ in float32 rounding); each route repeats
bitwise; "auto" follows the CPU as documented; bad modes are refused and change nothing."""

import platform

import pytest
import torch

from conv_helpers import ConvCase
from helpers import EMULATING_CUDA, conv_blas
from hiertcn_fast import _extension
from hiertcn_fast.ops import causal_conv1d, causal_conv1d_reference, cpu_conv_blas, set_cpu_conv_blas

pytestmark = [
    pytest.mark.skipif(not _extension.loaded(), reason="the setting belongs to the compiled extension"),
    # Under HIERTCN_EMULATE_CUDA the cpu backend runs csrc/cuda's kernels, which have no BLAS route.
    pytest.mark.skipif(EMULATING_CUDA, reason="the CUDA emulator has no BLAS route"),
]

# Dense, >= 32 channels in and out, >= 2**19 multiply-adds: the size the BLAS route takes when it is on. HierTCN's
# layer (b=32, t=21, 128 channels, k=5) with a context and a residual, and one with a tap past the start.
BIG_CASES = [
    ConvCase(8, 21, 128, 128, 5, 2, context_channels=16, activation="relu", residual=True),
    ConvCase(3, 57, 48, 40, 4, 16, context_channels=3, activation="gelu", residual=True),
    ConvCase(4, 64, 64, 32, 3, 1, activation="tanh", bias=False),
]
LEAVES = ("x", "weight", "bias", "context", "context_weight", "residual")


@pytest.fixture(autouse=True)
def _setting_restored():
    before = cpu_conv_blas()["mode"]
    yield
    after = set_cpu_conv_blas(before)
    assert after == before, f"a test left the conv BLAS mode at {after!r}"


def _run(case_args, grad_out, op=lambda **args: causal_conv1d(backend="cpu", **args)):
    """Output and the gradient of every leaf, on the cpu backend (or through op)."""
    args = {name: value.detach().clone().requires_grad_() if isinstance(value, torch.Tensor) else value
            for name, value in case_args.items()}
    out = op(**args)
    leaves = [name for name in LEAVES if name in args]
    grads = torch.autograd.grad(out, [args[name] for name in leaves], grad_out)
    return out.detach(), dict(zip(leaves, grads))


def _inputs(case, dtype, seed=3):
    torch.manual_seed(seed)
    args = case.inputs(dtype, "cpu")
    grad_out = torch.randn(case.batch, case.time, case.out_channels, dtype=dtype)
    return args, grad_out


@pytest.mark.parametrize("route", ["always", "never"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", BIG_CASES, ids=str)
def test_route_matches_reference(route, dtype, case):
    args, grad_out = _inputs(case, dtype)
    # The reference in float64 from the same values: the truth both dtypes are held to.
    args64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    want_out, want_grads = _run(args64, grad_out.double(), causal_conv1d_reference)
    with conv_blas(route):
        assert cpu_conv_blas() == {"mode": route, "blas": route == "always"}
        out, grads = _run(args, grad_out)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.double(), want_out, **tol)
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), want_grads[name], **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", BIG_CASES[:2], ids=str)
def test_routes_differ_in_rounding_and_each_repeats(case):
    """The setting takes effect: in float32 the two routes sum in different orders, so their outputs differ in the
    last bits (a setting that changed nothing would give the same bits); each route gives the same bits twice."""
    args, grad_out = _inputs(case, torch.float32)
    runs = {}
    for route in ("always", "never"):
        with conv_blas(route):
            first, second = _run(args, grad_out), _run(args, grad_out)
        for (a, b) in ((first[0], second[0]), *zip(first[1].values(), second[1].values())):
            assert torch.equal(a, b), f"route {route} is not repeatable"
        runs[route] = first
    blas, micro = runs["always"], runs["never"]
    torch.testing.assert_close(blas[0], micro[0], rtol=2e-5, atol=2e-5)
    assert not torch.equal(blas[0], micro[0]), "forcing the BLAS route on and off gave the same bits"
    # The weight gradient is a reduction over batch and time, which the two routes also order differently.
    torch.testing.assert_close(blas[1]["weight"], micro[1]["weight"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(blas[1]["weight"], micro[1]["weight"])


def test_auto_runs_the_route_it_reports():
    case = BIG_CASES[0]
    args, grad_out = _inputs(case, torch.float32)
    with conv_blas("auto"):
        report = cpu_conv_blas()
        auto = _run(args, grad_out)
    assert report["mode"] == "auto"
    with conv_blas("always" if report["blas"] else "never"):
        forced = _run(args, grad_out)
    assert torch.equal(auto[0], forced[0])
    for name in auto[1]:
        assert torch.equal(auto[1][name], forced[1][name]), name


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, set()
    vendor, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


def test_auto_choice_follows_the_cpu():
    """Documented rule: the BLAS, except on an AMD CPU with AVX-512 (MKL runs its AVX2 kernels there)."""
    with conv_blas("auto"):
        report = cpu_conv_blas()
    if platform.machine() not in ("x86_64", "AMD64"):
        assert report["blas"] is True
        return
    vendor, flags = _cpuinfo()
    if vendor is None:
        pytest.skip("no /proc/cpuinfo to read the CPU from")
    assert report["blas"] is (not (vendor == "AuthenticAMD" and "avx512f" in flags)), (vendor, sorted(flags)[:8])


@pytest.mark.parametrize("bad", ["sometimes", "", "ALWAYS", None, 1, True])
def test_bad_mode_is_refused_and_changes_nothing(bad):
    with conv_blas("never"):
        with pytest.raises(ValueError, match="mode must be one of auto, always, never"):
            set_cpu_conv_blas(bad)
        assert cpu_conv_blas()["mode"] == "never"


def test_setter_returns_the_previous_mode():
    with conv_blas("always"):
        assert set_cpu_conv_blas("never") == "always"
        assert set_cpu_conv_blas("auto") == "never"
        assert cpu_conv_blas()["mode"] == "auto"


def test_small_and_depthwise_convolutions_ignore_the_setting():
    """Below the size, and grouped, convolutions always run the micro-kernels: the same bits under both modes."""
    for case in (ConvCase(2, 9, 16, 16, 3, 2, context_channels=2, activation="relu", residual=True),
                 ConvCase(8, 64, 128, 128, 5, 2, groups=128, activation="relu")):
        args, grad_out = _inputs(case, torch.float32)
        with conv_blas("always"):
            a = _run(args, grad_out)
        with conv_blas("never"):
            b = _run(args, grad_out)
        assert torch.equal(a[0], b[0]), str(case)
        for name in a[1]:
            assert torch.equal(a[1][name], b[1][name]), (str(case), name)


def _in_subprocess(env_value):
    import os
    import subprocess
    import sys
    env = {key: value for key, value in os.environ.items() if key != "HIERTCN_CPU_CONV_BLAS"}
    if env_value is not None:
        env["HIERTCN_CPU_CONV_BLAS"] = env_value
    return subprocess.run([sys.executable, "-c", "from hiertcn_fast.ops import cpu_conv_blas; print(cpu_conv_blas())"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["always", "never", "auto", None])
def test_environment_variable_sets_the_route_at_import(value):
    result = _in_subprocess(value)
    assert result.returncode == 0, result.stderr
    mode = value or "auto"
    with conv_blas("auto"):
        auto_blas = cpu_conv_blas()["blas"]
    blas = {"always": True, "never": False, "auto": auto_blas}[mode]
    assert result.stdout.strip() == str({"mode": mode, "blas": blas})


@pytest.mark.parametrize("value", ["sometimes", "", "Never"])
def test_bad_environment_variable_is_an_error_naming_it(value):
    result = _in_subprocess(value)
    assert result.returncode != 0
    assert "HIERTCN_CPU_CONV_BLAS environment variable must be one of auto, always, never" in result.stderr
    assert repr(value) in result.stderr


# ---- the micro-kernels' register blocks ------------------------------------------------------------------------
# The dense micro-kernels cut the output channels into register blocks of several vectors (three 8-lane vectors a
# row on AVX2, two 16-lane ones on AVX-512), then narrower blocks, then a scalar tail; the weight gradient cuts the
# input channels into blocks of 4 (AVX2) or 8 (AVX-512). Each channel's sum runs over the same taps, channels and
# rows in the same order whatever block holds it, so a conv's output channels and weight-gradient rows are bitwise
# those of a wider conv with the same leading filters, and its input gradient's channels bitwise those of a conv
# over more input channels: a block that read or wrote the wrong lanes, or summed in another order, breaks that.
WIDE = 136  # 5 x 24 + 16 channels on AVX2, 8 x 16 + 8 on AVX-512: every kind of block, and a tail on AVX-512
NARROW = [1, 4, 7, 8, 9, 16, 23, 24, 31, 40, 48, 56, 72, 127]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_micro_kernels_give_each_channel_the_same_bits_in_any_register_block(dtype):
    torch.manual_seed(11)
    batch, time, k, dilation = 3, 13, 3, 2
    x = torch.randn(batch, time, WIDE, dtype=dtype)
    weight = torch.randn(WIDE, WIDE, k, dtype=dtype) / WIDE ** 0.5
    bias = torch.randn(WIDE, dtype=dtype)
    grad_out = torch.randn(batch, time, WIDE, dtype=dtype)

    def conv(x, weight, bias, grad_out, activation="relu"):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = causal_conv1d(x, weight, bias, dilation=dilation, activation=activation, backend="cpu")
        grad_x, grad_weight = torch.autograd.grad(out, [x, weight], grad_out)
        return out.detach(), grad_x, grad_weight

    with conv_blas("never"):
        out, _, grad_weight = conv(x, weight, bias, grad_out)
        _, grad_x_linear, _ = conv(x, weight, bias, grad_out, activation=None)
        # the reference is a different sum order: close, not bitwise
        torch.testing.assert_close(out, causal_conv1d_reference(x, weight, bias, dilation=dilation,
                                                                activation="relu"))
        for width in NARROW:
            # fewer output channels: the same first output channels and weight-gradient rows
            out_n, _, grad_weight_n = conv(x, weight[:width], bias[:width], grad_out[..., :width])
            assert torch.equal(out_n, out[..., :width]), width
            assert torch.equal(grad_weight_n, grad_weight[:width]), width
            # fewer input channels, no activation (so the same gradient reaches the product): the same first
            # input-gradient channels (the input gradient's product has the input channels as its output width)
            _, grad_x_n, _ = conv(x[..., :width], weight[:, :width], bias, grad_out, activation=None)
            assert torch.equal(grad_x_n, grad_x_linear[..., :width]), width
