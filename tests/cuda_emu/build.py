"""Builds csrc/'s CUDA kernels for the CPU emulator of cuda_emu.h, as the op library hiertcn_fast_emu.

The sources compiled are the CUDA kernels (csrc/cuda/*.cu), the GRU drivers that call them
(csrc/cpu/gru_recurrence.cpp, whose CUDA branches every tensor takes here), the CPU launchers those
drivers link against, and the schemas (csrc/ops.cpp). Each is copied into the build folder with these
rewrites and no others, so that what runs is the kernels' own code:
  - the operator library hiertcn_fast becomes hiertcn_fast_emu (schemas, registrations, dispatcher
    lookups), and the C++ namespace hiertcn becomes hiertcn_emu (a macro), so nothing clashes with
    the real extension loaded in the same process;
  - cuda_emu.h replaces the CUDA headers; `kernel<<<grid, block, shared, stream>>>(args)` becomes
    `::cuda_emu::launch(kernel, grid, block, shared, stream)(args)`; an `extern __shared__` array
    becomes the block's emulated dynamic shared memory, a static one a static array poisoned per block;
  - the CUDA registrations become the CPU ones of hiertcn_fast_emu (so CPU tensors run the CUDA
    kernels), and the CPU registrations of the CPU sources are compiled but not registered;
  - in the GRU drivers, `t.is_cpu()` is false and `t.is_cuda()` true, for every tensor, and what only their CPU
    branches may call (at::cpu::, the CPU launchers, the concurrent product pairs) raises if reached.
A rewrite that finds nothing to rewrite fails the build, so that a change to the sources cannot turn the
emulation into a silent copy of the CPU path.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LIBRARY = "hiertcn_fast_emu"

KERNELS = ["cuda/causal_conv.cu", "cuda/gru_gates.cu", "cuda/gru_session.cu"]
DRIVERS = ["cpu/gru_recurrence.cpp"]
CPU_LAUNCHERS = ["cpu/gru_gates.cpp", "cpu/gru_session.cpp"]
SCHEMAS = ["ops.cpp"]

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w:, ]*>)?)\s*<<<(.*?)>>>\s*\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)((?:\[[^\]]+\])+)\s*;")
_CUDA_INCLUDE = re.compile(r"^#include <(?:ATen|c10)/cuda/[^>]+>\n", re.M)
_CPU_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(" + LIBRARY + r",\s*CPU,\s*m\)")
_CUDA_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(" + LIBRARY + r",\s*CUDA,\s*m\)")


class RewriteError(RuntimeError):
    pass


def _sub(pattern, replacement, text, path, what, count_at_least=1):
    new, count = (re.subn(pattern, replacement, text) if isinstance(pattern, str)
                  else pattern.subn(replacement, text))
    if count < count_at_least:
        raise RewriteError(f"{path}: expected {what}, found none; update tests/cuda_emu/build.py")
    return new


def rewrite(path: str, text: str) -> str:
    """The emulator's copy of csrc/<path> (see the module docstring)."""
    text = re.sub(r"\bhiertcn_fast\b", LIBRARY, text)
    if path in KERNELS:
        text = _sub(_CUDA_INCLUDE, "", text, path, "a CUDA include")
        text = cuda_syntax(text, path)
        if path != "cuda/gru_session.cu":  # its launchers are called by the drivers; it registers nothing
            text = _sub(_CUDA_REGISTRATION, f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)", text, path,
                        "a CUDA registration")
    if path in DRIVERS or path == "cpu/gru_gates.cpp":
        counter = iter(range(1_000_000))
        text = _sub(_CPU_REGISTRATION,
                    lambda _: f"[[maybe_unused]] static void cuda_emu_unregistered_{next(counter)}(torch::Library& m)",
                    text, path, "a CPU registration")
    if path in DRIVERS:
        text = _sub(_CUDA_REGISTRATION, f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)", text, path, "a CUDA registration")
        text = _sub(r"\b(\w+)\.is_cpu\(\)", r"::cuda_emu::on_cpu(\1)", text, path, "an is_cpu() branch")
        text = _sub(r"\b(\w+)\.is_cuda\(\)", r"::cuda_emu::on_cuda(\1)", text, path, "an is_cuda() branch")
        # What only the CPU branches may call fails loudly if the CUDA path reaches it.
        text = _sub(r"\bat::cpu::", "::cuda_emu::host_only::", text, path, "an at::cpu:: call")
        text = _sub(r"(?<!bool )\b(launch_\w+_cpu|run_pairs_concurrently)\(", r'(::cuda_emu::forbid("\1"), \1)(', text,
                    path, "a CPU launcher call")
    return f'#include "cuda_emu.h"  // emulator copy of csrc/{path}\n#line 1 "csrc/{path}"\n' + text


def cuda_syntax(text: str, path: str) -> str:
    """Kernel launches and __shared__ arrays in the emulator's C++: an extern one is the launch's dynamic shared
    memory, a static one a static array filled with 0xFF bytes at the start of every block."""
    text = _sub(_LAUNCH, r"::cuda_emu::launch(\1, \2)(", text, path, "a kernel launch")
    text = _EXTERN_SHARED.sub(r"\1* \2 = static_cast<\1*>(::cuda_emu::dynamic_shared());", text)
    text = _STATIC_SHARED.sub(r"static \1 \2\3; ::cuda_emu::poison_static_shared(\2, sizeof(\2));", text)
    if any("__shared__" in line.split("//")[0] for line in text.splitlines()):
        raise RewriteError(f"{path}: a __shared__ declaration the emulator does not know; update tests/cuda_emu/build.py")
    return text


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def sources(build_dir: Path) -> list[Path]:
    """The rewritten sources in build_dir, and the emulator's controls (control.cu, launches rewritten alike)."""
    out = []
    for rel in SCHEMAS + KERNELS + DRIVERS + CPU_LAUNCHERS:
        text = rewrite(rel, (ROOT / "csrc" / rel).read_text())
        target = build_dir / (rel.replace("/", "__").replace(".cu", "_cu") + ".cpp")
        _write_if_changed(target, text)
        out.append(target)
    control = build_dir / "control_cu.cpp"
    _write_if_changed(control, '#include "cuda_emu.h"  // emulator copy of tests/cuda_emu/control.cu\n'
                      '#line 1 "tests/cuda_emu/control.cu"\n' + cuda_syntax((HERE / "control.cu").read_text(),
                                                                            "control.cu"))
    out.append(control)
    return out


def build_dir() -> Path:
    import torch

    digest = hashlib.sha256(torch.__version__.encode() + str(ROOT).encode()).hexdigest()[:12]
    path = ROOT / "build" / f"cuda_emu-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load():
    """Builds (when anything changed) and loads the emulated library; returns torch.ops.hiertcn_fast_emu."""
    import torch
    from torch.utils import cpp_extension

    target = build_dir()
    paths = sources(target)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    cpp_extension.load(
        name="hiertcn_fast_cuda_emu",
        sources=[str(p) for p in paths],
        extra_include_paths=[str(ROOT / "csrc" / "include"), str(HERE)],
        extra_cflags=["-O1", "-DHIERTCN_WITH_CUDA=1", "-Dhiertcn=hiertcn_emu", "-Wno-unused-function"],
        build_directory=str(target),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.hiertcn_fast_emu
