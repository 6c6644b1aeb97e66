"""The CPU emulator of the CUDA kernels (see build.py and cuda_emu.h)."""
