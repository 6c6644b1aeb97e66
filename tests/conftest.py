"""Test-wide setup: device selection, NaN-poisoned outputs, the `gpu` marker, and Triton on the CPU.

Without a CUDA device the Triton kernels run in the interpreter on CPU tensors, so the triton backend
is tested in the same `pytest` command as everything else. TRITON_INTERPRET must be set before triton is
imported, which importing hiertcn_fast does (torch.library.triton_op): here, before the first import of it.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hiertcn_fast.ops._common import poison_outputs  # noqa: E402  (after TRITON_INTERPRET)

if os.environ.get("HIERTCN_EMULATE_CUDA") == "1":
    # The cpu backend's compiled ops with CUDA kernels run those kernels in the CPU emulator
    # (tests/cuda_emu): `make test-emulated` runs the op suites so.
    from cuda_emu import proxy as _emulation  # noqa: E402

    _emulation.install()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HIERTCN_EMULATE_CUDA") == "1":
        emulated = pytest.mark.skip(reason="asserts what only the CPU kernels do; the ops run the CUDA kernels here "
                                           "(HIERTCN_EMULATE_CUDA=1)")
        for item in items:
            if "cpu_kernels_only" in item.keywords:
                item.add_marker(emulated)
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _test_devices():
    """Devices to run device-generic tests on: HIERTCN_TEST_DEVICES (comma-separated) or all present."""
    wanted = os.environ.get("HIERTCN_TEST_DEVICES")
    if wanted:
        return [d.strip() for d in wanted.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(params=_test_devices())
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every output an op allocates starts as NaN, so an element a kernel forgets to write fails the test."""
    with poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
